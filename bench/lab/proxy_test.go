package lab

import (
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestProxy checks the proxy's faults on an echo server: a clean link carries every
// datagram both ways, a dropping one none, a duplicating one each twice.
func TestProxy(t *testing.T) {
	echo, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	require.NoError(t, err)
	defer echo.Close()
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := echo.ReadFromUDP(buf)
			if err != nil {
				return
			}
			_, _ = echo.WriteToUDP(buf[:n], from) // a lost echo shows as a missing count below
		}
	}()
	p, err := StartProxy(echo.LocalAddr().String(), Faults{})
	require.NoError(t, err)
	defer p.Close()
	c, err := net.Dial("udp", p.Addr())
	require.NoError(t, err)
	defer c.Close()
	// roundTrip sends one datagram and counts the echoes that come back within 300 ms.
	roundTrip := func(msg string) int {
		_, err := c.Write([]byte(msg))
		require.NoError(t, err)
		got := 0
		buf := make([]byte, 2048)
		for {
			require.NoError(t, c.SetReadDeadline(time.Now().Add(300*time.Millisecond)))
			n, err := c.Read(buf)
			if err != nil {
				return got
			}
			require.Equal(t, msg, string(buf[:n]))
			got++
		}
	}
	require.Equal(t, 1, roundTrip("clean"))
	p.SetFaults(Faults{Drop: 1})
	require.Equal(t, 0, roundTrip("dropped"))
	p.SetFaults(Faults{Dup: 1})
	require.Equal(t, 4, roundTrip("twice each way"), "duplicated on the way there and back: %+v", p.Stats())
	p.SetFaults(Faults{Reorder: 1, Delay: 5 * time.Millisecond})
	require.Equal(t, 1, roundTrip("late"))
	s := p.Stats()
	require.Equal(t, int64(1), s.Dropped)
	require.Equal(t, int64(3), s.Duplicated, "one datagram there, two echoes back")
	require.Equal(t, int64(2), s.Reordered)
}
