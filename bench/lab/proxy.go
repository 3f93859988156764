package lab

import (
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// Faults say what a Proxy does to the datagrams it forwards, each drawn at random
// per datagram and direction.
type Faults struct {
	Drop    float64       // share dropped
	Dup     float64       // share sent twice
	Reorder float64       // share held back by an extra 2 to 20 ms, so that later ones overtake
	Delay   time.Duration // added to every datagram
}

// ProxyStats counts what a Proxy did.
type ProxyStats struct {
	Forwarded, Dropped, Duplicated, Reordered int64
}

// Proxy forwards UDP datagrams between clients on loopback and one server, through the
// Faults set on it: a lossy link of our own, for QUIC.
type Proxy struct {
	ln     *net.UDPConn
	target *net.UDPAddr

	mu     sync.Mutex
	faults Faults
	rnd    *rand.Rand
	peers  map[string]*net.UDPConn // client address -> the socket that talks to the server for it
	closed bool

	forwarded, dropped, duplicated, reordered atomic.Int64
	wg                                        sync.WaitGroup
}

// StartProxy listens on a free loopback UDP port and forwards to target.
func StartProxy(target string, f Faults) (*Proxy, error) {
	taddr, err := net.ResolveUDPAddr("udp", target)
	if err != nil {
		return nil, err
	}
	ln, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, err
	}
	p := &Proxy{ln: ln, target: taddr, faults: f, rnd: rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64())), peers: map[string]*net.UDPConn{}}
	p.wg.Add(1)
	go p.fromClients()
	return p, nil
}

// Addr is the address clients send to.
func (p *Proxy) Addr() string { return p.ln.LocalAddr().String() }

// SetFaults changes the faults from now on.
func (p *Proxy) SetFaults(f Faults) {
	p.mu.Lock()
	p.faults = f
	p.mu.Unlock()
}

// Stats says what the proxy has done so far.
func (p *Proxy) Stats() ProxyStats {
	return ProxyStats{p.forwarded.Load(), p.dropped.Load(), p.duplicated.Load(), p.reordered.Load()}
}

// Close stops forwarding.
func (p *Proxy) Close() {
	p.mu.Lock()
	p.closed = true
	p.ln.Close()
	for _, c := range p.peers {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

func (p *Proxy) fromClients() {
	defer p.wg.Done()
	buf := make([]byte, 65536)
	for {
		n, from, err := p.ln.ReadFromUDP(buf)
		if err != nil {
			return
		}
		up, err := p.upstream(from)
		if err != nil {
			continue
		}
		// A datagram that cannot be sent is lost, as the network may lose any: QUIC resends.
		p.send(buf[:n], func(b []byte) { _, _ = up.Write(b) })
	}
}

// upstream returns the socket that carries from's datagrams to the server, and starts
// the loop that carries the answers back.
func (p *Proxy) upstream(from *net.UDPAddr) (*net.UDPConn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c, ok := p.peers[from.String()]; ok {
		return c, nil
	}
	if p.closed {
		return nil, net.ErrClosed
	}
	c, err := net.DialUDP("udp", nil, p.target)
	if err != nil {
		return nil, err
	}
	p.peers[from.String()] = c
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		buf := make([]byte, 65536)
		for {
			n, err := c.Read(buf)
			if err != nil {
				return
			}
			// A datagram that cannot be sent is lost, as the network may lose any.
			p.send(buf[:n], func(b []byte) { _, _ = p.ln.WriteToUDP(b, from) })
		}
	}()
	return c, nil
}

// send applies the faults to one datagram and hands it, or its copies, to write.
func (p *Proxy) send(b []byte, write func([]byte)) {
	p.mu.Lock()
	f := p.faults
	drop, dup, reorder := p.rnd.Float64() < f.Drop, p.rnd.Float64() < f.Dup, p.rnd.Float64() < f.Reorder
	extra := time.Duration(2+p.rnd.IntN(18)) * time.Millisecond
	p.mu.Unlock()
	if drop {
		p.dropped.Add(1)
		return
	}
	delay := f.Delay
	if reorder {
		p.reordered.Add(1)
		delay += extra
	}
	copies := 1
	if dup {
		p.duplicated.Add(1)
		copies = 2
	}
	p.forwarded.Add(1)
	if delay == 0 {
		for range copies {
			write(b)
		}
		return
	}
	c := append([]byte(nil), b...)
	time.AfterFunc(delay, func() {
		for range copies {
			write(c)
		}
	})
}
