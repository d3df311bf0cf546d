package udp

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"

	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/tunnel"
)

// Options configure a Transport.
type Options struct {
	// Local addresses to bind, one per underlay family in use; at least
	// one must be valid. Port 0 picks a free port (tests).
	Local4, Local6 netip.AddrPort
	// MTU is the underlay link MTU; datagrams never exceed it.
	MTU int
	// Accept reports whether a source address and port are a peer's
	// published endpoint. Datagrams from anywhere else (another host, or
	// another port on a peer's host) are dropped before any state is kept.
	// Nil accepts all (tests).
	Accept func(netip.AddrPort) bool
	// DisableGSO and DisableGRO turn UDP_SEGMENT sends and UDP_GRO
	// receives off (for comparison and for broken drivers).
	DisableGSO, DisableGRO bool
	Counters               *Counters
	Logger                 *slog.Logger
}

// Transport implements tunnel.Transport over UDP sockets.
type Transport struct {
	opt    Options
	ctr    *Counters
	log    *slog.Logger
	socks  []*socket // index 0: IPv4 if bound, then IPv6
	sender sender
	closed atomic.Bool
}

var _ tunnel.Transport = (*Transport)(nil)

// batchConn is what x/net's ipv4 and ipv6 PacketConns have in common.
type batchConn interface {
	ReadBatch(ms []ipv4.Message, flags int) (int, error)
	WriteBatch(ms []ipv4.Message, flags int) (int, error)
}

type socket struct {
	name   string // local address, for logs
	v6     bool
	conn   *net.UDPConn
	bc     batchConn
	maxDg  atomic.Int32 // largest UDP payload that fits the underlay MTU
	gsoOff atomic.Bool  // UDP GSO failed (EIO) or is disabled
	gro    bool
}

// MaxPayload returns the largest UDP payload per datagram for an underlay
// of the given MTU and family.
func MaxPayload(mtu int, v6 bool) int {
	if v6 {
		return mtu - 40 - 8
	}
	return mtu - 20 - 8
}

// InnerMTU is the TUN MTU for an underlay MTU: the largest plain packet
// that fits one datagram with header and descriptor.
func InnerMTU(mtu int, v6 bool) int { return MaxPayload(mtu, v6) - Overhead }

// MaxFrame is the largest super-packet (the TUN's gso_max_size) whose
// train fits one UDP GSO send on an underlay of the given MTU: at most
// maxGSOSegments datagrams and maxGSOBytes bytes.
func MaxFrame(mtu int, v6 bool) int {
	dg := MaxPayload(mtu, v6)
	return min(min(maxGSOSegments, maxGSOBytes/dg)*(dg-HeaderLen)-DescLen, 65536)
}

// SetMTU follows an underlay MTU change: datagrams are cut to fit it from
// the next frame on (frames are carried whole, so a super-packet in flight
// just becomes a longer train).
func (t *Transport) SetMTU(mtu int) {
	for _, s := range t.socks {
		s.maxDg.Store(int32(MaxPayload(mtu, s.v6)))
	}
}

// New binds the sockets.
func New(opt Options) (*Transport, error) {
	if opt.Counters == nil {
		opt.Counters = &Counters{}
	}
	if opt.Logger == nil {
		opt.Logger = slog.Default()
	}
	if opt.Accept == nil {
		opt.Accept = func(netip.AddrPort) bool { return true }
	}
	if !opt.Local4.IsValid() && !opt.Local6.IsValid() {
		return nil, errors.New("udp transport: no local address to bind")
	}
	if InnerMTU(opt.MTU, opt.Local6.IsValid() && !opt.Local4.IsValid()) < 576 {
		return nil, fmt.Errorf("udp transport: underlay MTU %d too small", opt.MTU)
	}
	t := &Transport{opt: opt, ctr: opt.Counters, log: opt.Logger}
	for _, la := range []netip.AddrPort{opt.Local4, opt.Local6} {
		if !la.IsValid() {
			continue
		}
		s, err := t.listen(la)
		if err != nil {
			t.Close()
			return nil, err
		}
		t.socks = append(t.socks, s)
	}
	t.sender.init(t)
	return t, nil
}

func (t *Transport) listen(la netip.AddrPort) (*socket, error) {
	v6 := la.Addr().Is6() && !la.Addr().Is4In6()
	network := "udp4"
	if v6 {
		network = "udp6"
	}
	c, err := net.ListenUDP(network, net.UDPAddrFromAddrPort(la))
	if err != nil {
		return nil, fmt.Errorf("udp transport: listen %s: %w", la, err)
	}
	s := &socket{name: c.LocalAddr().String(), v6: v6, conn: c}
	s.maxDg.Store(int32(MaxPayload(t.opt.MTU, v6)))
	if v6 {
		s.bc = ipv6.NewPacketConn(c)
	} else {
		s.bc = ipv4.NewPacketConn(c)
	}
	s.gsoOff.Store(t.opt.DisableGSO)
	// Large socket buffers absorb bursts of 64 KB trains; FORCE works as
	// root past net.core.[rw]mem_max, the plain call is the fallback.
	rc, err := c.SyscallConn()
	if err != nil {
		c.Close()
		return nil, err
	}
	rc.Control(func(fd uintptr) {
		const bufSize = 8 << 20
		if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, bufSize) != nil {
			unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, bufSize)
		}
		if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, bufSize) != nil {
			unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF, bufSize)
		}
		if !t.opt.DisableGRO {
			s.gro = unix.SetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_GRO, 1) == nil
		}
	})
	t.log.Info("udp transport listening", "addr", c.LocalAddr(), "gso", !s.gsoOff.Load(), "gro", s.gro, "max_datagram", s.maxDg.Load())
	return s, nil
}

// LocalAddrs returns the bound addresses (with the chosen ports).
func (t *Transport) LocalAddrs() []netip.AddrPort {
	var out []netip.AddrPort
	for _, s := range t.socks {
		out = append(out, s.conn.LocalAddr().(*net.UDPAddr).AddrPort())
	}
	return out
}

// Close implements tunnel.Transport.
func (t *Transport) Close() error {
	if t.closed.Swap(true) {
		return nil
	}
	var errs []error
	for _, s := range t.socks {
		errs = append(errs, s.conn.Close())
	}
	return errors.Join(errs...)
}

// sockFor returns the socket of dst's family.
func (t *Transport) sockFor(dst netip.AddrPort) *socket {
	v6 := dst.Addr().Is6() && !dst.Addr().Is4In6()
	for _, s := range t.socks {
		if s.v6 == v6 {
			return s
		}
	}
	return nil
}

// Receivers implements tunnel.Transport.
func (t *Transport) Receivers() []tunnel.ReceiveFunc {
	var fns []tunnel.ReceiveFunc
	for _, s := range t.socks {
		r := newReceiver(t, s.bc.ReadBatch, s.gro)
		fns = append(fns, r.receive)
	}
	return fns
}

// udpAddrCache maps peers to the *net.UDPAddr x/net wants, so sends do not
// allocate. Used by the sending goroutine only.
type udpAddrCache struct {
	mu sync.Mutex
	m  map[netip.AddrPort]*net.UDPAddr
}

func (c *udpAddrCache) get(a netip.AddrPort) *net.UDPAddr {
	c.mu.Lock()
	defer c.mu.Unlock()
	if u, ok := c.m[a]; ok {
		return u
	}
	if c.m == nil || len(c.m) > 4096 {
		c.m = map[netip.AddrPort]*net.UDPAddr{}
	}
	u := net.UDPAddrFromAddrPort(a)
	c.m[a] = u
	return u
}
