// Package udpsock is the UDP socket plumbing the userspace backends share:
// binding with large buffers and UDP_GRO, batched sends (sendmmsg) of UDP
// GSO trains (UDP_SEGMENT) with the fallback to plain datagrams when a
// device refuses GSO, and reading the GRO segment size of a received
// message. It knows nothing of what the datagrams carry: encap/udp and
// encap/vxlan lay out their own formats on top.
package udpsock

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"
)

const (
	// MaxGSOSegments is the kernel's per-send limit (UDP_MAX_SEGMENTS was
	// 64 before Linux 5.?; 64 is safe everywhere).
	MaxGSOSegments = 64
	// MaxGSOBytes bounds one UDP_SEGMENT send (a UDP length is 16 bits).
	MaxGSOBytes = 65000
	// bufSize is the send and receive buffer asked for: large enough to
	// absorb bursts of 64 KB trains.
	bufSize = 8 << 20
)

// BatchConn is what x/net's ipv4 and ipv6 PacketConns have in common.
type BatchConn interface {
	ReadBatch(ms []ipv4.Message, flags int) (int, error)
	WriteBatch(ms []ipv4.Message, flags int) (int, error)
}

// Socket is one bound UDP socket of an underlay family.
type Socket struct {
	Name string // local address, for logs
	V6   bool
	Conn *net.UDPConn
	BC   BatchConn
	// GRO reports whether UDP_GRO is on: received messages may hold
	// several datagrams of the size GROSize reads.
	GRO    bool
	gsoOff atomic.Bool
	maxDg  atomic.Int32
	// Sparse, when not nil, is a second socket on the same address that
	// receives (and sends) what is flagged as sparse flows'
	// (ListenSteered); NoSparse says why there is none.
	Sparse   *Socket
	NoSparse error
}

// MaxPayload returns the largest UDP payload one datagram carries on
// the underlay (SetMTU).
func (s *Socket) MaxPayload() int { return int(s.maxDg.Load()) }

// SetMTU sets the underlay MTU datagrams must fit from now on (on the
// sparse socket too).
func (s *Socket) SetMTU(mtu int) {
	s.maxDg.Store(int32(Payload(mtu, s.V6)))
	if s.Sparse != nil {
		s.Sparse.SetMTU(mtu)
	}
}

// Is6 reports whether a is an IPv6 address (not an IPv4-mapped one).
func Is6(a netip.Addr) bool { return a.Is6() && !a.Is4In6() }

// Listen binds la with large buffers (FORCE works as root past
// net.core.[rw]mem_max; the plain call is the fallback) and, unless
// noGRO, UDP_GRO where the kernel has it. noGSO starts with UDP GSO off.
func Listen(la netip.AddrPort, noGSO, noGRO bool) (*Socket, error) {
	return listen(la, noGSO, noGRO, false)
}

func listen(la netip.AddrPort, noGSO, noGRO, reuse bool) (*Socket, error) {
	v6 := Is6(la.Addr())
	c, err := bindUDP(la, v6, reuse)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", la, err)
	}
	s := &Socket{Name: c.LocalAddr().String(), V6: v6, Conn: c}
	if v6 {
		s.BC = ipv6.NewPacketConn(c)
	} else {
		s.BC = ipv4.NewPacketConn(c)
	}
	s.gsoOff.Store(noGSO)
	rc, err := c.SyscallConn()
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("listen %s: %w", la, err)
	}
	rc.Control(func(fd uintptr) {
		if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, bufSize) != nil {
			unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, bufSize)
		}
		if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, bufSize) != nil {
			unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUF, bufSize)
		}
		if !noGRO {
			s.GRO = unix.SetsockoptInt(int(fd), unix.IPPROTO_UDP, unix.UDP_GRO, 1) == nil
		}
	})
	return s, nil
}

// LocalAddr returns the bound address (with the chosen port).
func (s *Socket) LocalAddr() netip.AddrPort { return s.Conn.LocalAddr().(*net.UDPAddr).AddrPort() }

// GSO reports whether UDP GSO sends are on.
func (s *Socket) GSO() bool { return !s.gsoOff.Load() }

// Payload returns the largest UDP payload per datagram on an underlay of
// the given MTU and family.
func Payload(mtu int, v6 bool) int {
	if v6 {
		return mtu - 40 - 8
	}
	return mtu - 20 - 8
}

// AddrCache maps endpoints to the *net.UDPAddr x/net wants, so sends do
// not allocate.
type AddrCache struct {
	mu sync.Mutex
	m  map[netip.AddrPort]*net.UDPAddr
}

// Get returns a's *net.UDPAddr.
func (c *AddrCache) Get(a netip.AddrPort) *net.UDPAddr {
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

// Source returns a received message's source, unmapped.
func Source(m *ipv4.Message) (netip.AddrPort, bool) {
	ua, ok := m.Addr.(*net.UDPAddr)
	if !ok {
		return netip.AddrPort{}, false
	}
	ap := ua.AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), true
}

// GROSize returns the UDP_GRO segment size from a control message buffer,
// or 0.
func GROSize(oob []byte) int {
	for len(oob) >= unix.CmsgLen(0) {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
		l := int(h.Len)
		if l < unix.CmsgLen(0) || l > len(oob) {
			return 0
		}
		if h.Level == unix.SOL_UDP && h.Type == unix.UDP_GRO && l >= unix.CmsgLen(2) {
			d := oob[unix.CmsgLen(0):l]
			if len(d) >= 4 {
				return int(binary.NativeEndian.Uint32(d))
			}
			return int(binary.NativeEndian.Uint16(d))
		}
		oob = oob[min(cmsgAlign(l), len(oob)):]
	}
	return 0
}

func cmsgAlign(n int) int { return (n + 7) &^ 7 }

// OOBSize is the control buffer a receive needs for GROSize.
var OOBSize = unix.CmsgSpace(4) * 2

// putSegmentCmsg writes a UDP_SEGMENT control message into b.
func putSegmentCmsg(b []byte, seg uint16) []byte {
	h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
	h.Level = unix.SOL_UDP
	h.Type = unix.UDP_SEGMENT
	h.SetLen(unix.CmsgLen(2))
	binary.NativeEndian.PutUint16(b[unix.CmsgLen(0):], seg)
	return b[:unix.CmsgSpace(2)]
}

// Sockets are a backend's bound sockets, at most one per underlay family.
type Sockets []*Socket

// For returns the socket of dst's family, or nil.
func (ss Sockets) For(dst netip.AddrPort) *Socket {
	v6 := Is6(dst.Addr())
	for _, s := range ss {
		if s.V6 == v6 {
			return s
		}
	}
	return nil
}

// SetMTU follows an underlay MTU change on every socket.
func (ss Sockets) SetMTU(mtu int) {
	for _, s := range ss {
		s.SetMTU(mtu)
	}
}

// Close closes every socket.
func (ss Sockets) Close() error {
	var errs []error
	for _, s := range ss {
		errs = append(errs, s.Conn.Close())
		if s.Sparse != nil {
			errs = append(errs, s.Sparse.Conn.Close())
		}
	}
	return errors.Join(errs...)
}
