package tail

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"github.com/jackc/pgx/v5"

	"github.com/walship/walship/tail/wal"
)

// Server is what the sidecar learns from the primary at connect.
type Server struct {
	VersionNum int    // server_version_num, e.g. 150004
	SysID      uint64 // pg_control_system().system_identifier
	SegSize    uint64 // wal_segment_size, bytes
	BlockSize  uint64 // wal_block_size, bytes
	DataDir    string // data_directory
	Magic      uint16 // XLOG_PAGE_MAGIC of the major version
}

// stream is the WAL stream the server writes.
func (s Server) stream() wal.Stream {
	return wal.Stream{SysID: s.SysID, SegSize: s.SegSize, BlockSize: s.BlockSize, Magic: s.Magic}
}

// ErrInRecovery means the server is a standby: it has no flush position of its own to
// ship until it is promoted.
var ErrInRecovery = errors.New("server is in recovery")

// ReadServer reads the facts the sidecar needs from a connected server.
func ReadServer(ctx context.Context, conn *pgx.Conn) (Server, error) {
	var s Server
	var v string
	if err := conn.QueryRow(ctx, "SHOW server_version_num").Scan(&v); err != nil {
		return s, fmt.Errorf("read server_version_num: %w", err)
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		return s, fmt.Errorf("read server_version_num %q: %w", v, err)
	}
	s.VersionNum = n
	if s.Magic, err = wal.MagicFor(n); err != nil {
		return s, err
	}
	err = conn.QueryRow(ctx, `SELECT (SELECT system_identifier FROM pg_control_system()),
		(SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'),
		(SELECT setting::bigint FROM pg_settings WHERE name = 'wal_block_size'),
		current_setting('data_directory')`).Scan(&s.SysID, &s.SegSize, &s.BlockSize, &s.DataDir)
	if err != nil {
		return s, fmt.Errorf("read system identifier, wal_segment_size, wal_block_size and data_directory (the sidecar's role needs superuser or pg_read_all_settings): %w", err)
	}
	if err := wal.CheckSegSize(s.SegSize); err != nil {
		return s, fmt.Errorf("server: %w", err)
	}
	return s, nil
}

// InRecovery says whether the server is a standby.
func InRecovery(ctx context.Context, conn *pgx.Conn) (bool, error) {
	var r bool
	if err := conn.QueryRow(ctx, "SELECT pg_is_in_recovery()").Scan(&r); err != nil {
		return false, fmt.Errorf("read pg_is_in_recovery(): %w", err)
	}
	return r, nil
}

// positionsQuery reads the flush and insert positions and the name of the WAL file the
// flush position falls in. MagicFor has refused servers before PostgreSQL 13, so the
// functions have their names of PostgreSQL 10 and later.
const positionsQuery = "SELECT pg_current_wal_flush_lsn(), pg_current_wal_insert_lsn(), pg_walfile_name(pg_current_wal_flush_lsn())"

// Positions is where a primary's WAL stands.
type Positions struct {
	Flush  wal.LSN // flushed: durable on the primary, and what may be shipped
	Insert wal.LSN // inserted into the WAL buffers, maybe not yet written or flushed
	TLI    uint32
}

// Settled says whether all WAL inserted is flushed: no write or flush is due that
// would move the flush position. The insert position of a settled server may point
// past the header of the page that starts at the flush position (xlog.c:
// XLogBytePosToRecPtr skips page headers), which counts as settled.
func (p Positions) Settled(segSize, blockSize uint64) bool {
	if p.Insert <= p.Flush {
		return true
	}
	return uint64(p.Flush)%blockSize == 0 && p.Insert-p.Flush <= wal.LSN(wal.HeaderSize(p.Flush, segSize))
}

// Positions reads the primary's flush and insert positions and its timeline. The
// segment and offset are computed from the LSN by the caller; the file name is used
// only for its timeline, because pg_walfile_name() names the previous segment at an
// exact boundary up to PostgreSQL 16.
func (s Server) Positions(ctx context.Context, conn *pgx.Conn) (Positions, error) {
	var p Positions
	var file string
	if err := conn.QueryRow(ctx, positionsQuery).Scan(&p.Flush, &p.Insert, &file); err != nil {
		return p, fmt.Errorf("read flush position: %w", err)
	}
	if len(file) != 24 {
		return p, fmt.Errorf("read flush position: wal file name %q is not 24 characters", file)
	}
	tli, err := strconv.ParseUint(file[:8], 16, 32)
	if err != nil || tli == 0 {
		return p, fmt.Errorf("read flush position: timeline of wal file name %q: bad hex", file)
	}
	p.TLI = uint32(tli)
	return p, nil
}

// Application names the sidecar's connections carry in pg_stat_activity, unless the
// DSN sets one.
const (
	AppTail = "walship tail"
	AppSlot = "walship slot"
)

// connect opens a connection to the server named by dsn, as application app unless the
// DSN names one: a DBA then tells walship's sessions apart in pg_stat_activity.
func connect(ctx context.Context, dsn, app string) (*pgx.Conn, error) {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, err
	}
	if _, ok := cfg.RuntimeParams["application_name"]; !ok {
		cfg.RuntimeParams["application_name"] = app
	}
	return pgx.ConnectConfig(ctx, cfg)
}
