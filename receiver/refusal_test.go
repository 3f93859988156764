package receiver

import (
	"errors"
	"fmt"
	"io"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/walship/walship/receiver/spool"
	"github.com/walship/walship/tail/wal"
	"github.com/walship/walship/transport"
)

// TestReasonOf sorts refusals as the session wraps them (refuse, fmt.Errorf with %w,
// errors.Join).
func TestReasonOf(t *testing.T) {
	_, oldVersion := checkHello(&transport.Hello{Version: transport.Version - 1})
	_, notHello := checkHello(&transport.Ack{TLI: 1})
	_, zeroSysID := checkHello(&transport.Hello{Version: transport.Version, SegSize: 16 << 20, BlockSize: 8192, Magic: 0xD110})
	cases := map[string]struct {
		err  error
		want RefusalReason
	}{
		"another cluster":       {fmt.Errorf("bind: %w", spool.ErrWrongCluster), RefusedCluster},
		"another version":       {oldVersion, RefusedVersion},
		"a bad hash":            {fmt.Errorf("data frame: %w", transport.ErrChecksum), RefusedChecksum},
		"a bad page":            {fmt.Errorf("frame for x: %w", &wal.PageError{Reason: "magic"}), RefusedPage},
		"a gap":                 {fmt.Errorf("frame: %w", ErrGap), RefusedOrder},
		"a timeline":            {fmt.Errorf("frame: %w", ErrTimeline), RefusedOrder},
		"conflicting bytes":     {fmt.Errorf("segment: %w", spool.ErrConflict), RefusedOrder},
		"a misplaced mark":      {&misplacedEndError{mark: wal.Position{TLI: 1, LSN: 8}, held: wal.Position{TLI: 1}}, RefusedOrder},
		"frozen, sync failed":   {errors.Join(spool.ErrFrozen, io.ErrShortWrite), RefusedFrozen},
		"not a hello":           {notHello, RefusedOther},
		"a bad stream":          {zeroSysID, RefusedOther},
		"a malformed frame":     {fmt.Errorf("%w: short", transport.ErrMalformed), RefusedOther},
		"the writer lock":       {spool.ErrLocked, RefusedOther},
		"an I/O error":          {io.ErrUnexpectedEOF, RefusedOther},
		"refused, then wrapped": {fmt.Errorf("session: %w", refuse(transport.ErrChecksum)), RefusedChecksum},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			got := reasonOf(refuse(c.err))
			require.Equal(t, c.want, got, "got %s, want %s", got, c.want)
		})
	}
}

// TestRefusalReasons: every reason has its own label value.
func TestRefusalReasons(t *testing.T) {
	seen := map[string]bool{}
	for _, why := range RefusalReasons() {
		require.False(t, seen[why.String()], "%s twice", why)
		seen[why.String()] = true
	}
	require.Equal(t, map[string]bool{"cluster": true, "version": true, "checksum": true, "page": true, "order": true, "frozen": true, "other": true}, seen)
}
