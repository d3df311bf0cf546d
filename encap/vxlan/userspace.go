package vxlan

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"sync/atomic"

	"github.com/tulle-net/tulle/encap/internal/udpsock"
	"github.com/tulle-net/tulle/internal/pool"
	"github.com/tulle-net/tulle/tunnel"
)

// VXLAN wire format (RFC 7348), as the UDP payload:
//
//	0      flags: 0x08 (I: the VNI is valid); other bits reserved
//	1..3   reserved
//	4..6   VNI (24 bits, big endian)
//	7      reserved
//	8..21  inner Ethernet: destination MAC, source MAC, EtherType
//	22..   inner IP packet
const (
	HeaderLen = 8
	ethLen    = 14
	// EncapLen is what userspace VXLAN puts in front of an IP packet
	// inside the UDP payload.
	EncapLen = HeaderLen + ethLen

	flagI         = 0x08
	etherTypeIPv4 = 0x0800
	etherTypeIPv6 = 0x86dd
)

// UserspaceConfig configures userspace VXLAN.
type UserspaceConfig struct {
	VNI int
	// Port is the VXLAN UDP port: bound on Local4/Local6 and sent to.
	Port int
	MAC  net.HardwareAddr // this node's VTEP MAC
	// Local4 and Local6 are the underlay addresses to bind (either may be
	// invalid, not both).
	Local4, Local6 netip.Addr
	// MTU is the underlay MTU.
	MTU                    int
	DisableGSO, DisableGRO bool
	Counters               *Counters
	Logger                 *slog.Logger
}

// Endpoint is one peer served by userspace VXLAN.
type Endpoint struct {
	// Addr is the peer's VTEP address and VXLAN port.
	Addr netip.AddrPort
	MAC  net.HardwareAddr
}

// Userspace speaks VXLAN from tulled's datapath: a tunnel.Transport whose
// datagrams a kernel VXLAN device (flannel's, or a tulled's) takes as its
// own. Super-packets are cut into segments in software (tunnel.Segment)
// and leave as UDP GSO sends; received datagrams (UDP GRO batches) become
// plain IP packets that the TUN's GRO coalesces again.
//
// Peers are identified by source address alone: a kernel VXLAN device
// sends from a port hashed from the inner flow, so the port says nothing.
// Received frames carry the peer's Endpoint.Addr, the address the peer
// table knows it by.
type Userspace struct {
	cfg   UserspaceConfig
	ctr   *Counters
	log   *slog.Logger
	vni   [3]byte
	socks udpsock.Sockets
	peers atomic.Pointer[peerSet]

	senders *pool.Pool[vsender]
	closed  atomic.Bool
}

var _ tunnel.Transport = (*Userspace)(nil)

// peerSet is an immutable snapshot of the peers.
type peerSet struct {
	byAddr map[netip.AddrPort]*peerHdr
	byIP   map[netip.Addr]netip.AddrPort
}

// peerHdr is the encapsulation prefix towards one peer, built once.
type peerHdr struct {
	v4, v6 [EncapLen]byte // by inner family (EtherType)
}

// NewUserspace binds the VXLAN port.
func NewUserspace(cfg UserspaceConfig) (*Userspace, error) {
	if cfg.Counters == nil {
		cfg.Counters = &Counters{}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.VNI < 1 || cfg.VNI > 1<<24-1 {
		return nil, fmt.Errorf("userspace vxlan: VNI %d out of range", cfg.VNI)
	}
	if len(cfg.MAC) != 6 {
		return nil, fmt.Errorf("userspace vxlan: VTEP MAC %q is not 6 bytes", cfg.MAC)
	}
	if !cfg.Local4.IsValid() && !cfg.Local6.IsValid() {
		return nil, errors.New("userspace vxlan: no local address to bind")
	}
	u := newUserspace(cfg)
	for _, a := range []netip.Addr{cfg.Local4, cfg.Local6} {
		if !a.IsValid() {
			continue
		}
		s, err := udpsock.Listen(netip.AddrPortFrom(a, uint16(cfg.Port)), cfg.DisableGSO, cfg.DisableGRO)
		if err != nil {
			u.Close()
			return nil, fmt.Errorf("userspace vxlan: %w", err)
		}
		s.SetMTU(cfg.MTU)
		u.socks = append(u.socks, s)
		u.log.Info("userspace vxlan listening", "addr", s.Name, "vni", cfg.VNI, "mac", cfg.MAC, "gso", s.GSO(), "gro", s.GRO)
	}
	return u, nil
}

// newUserspace returns a Userspace without sockets.
func newUserspace(cfg UserspaceConfig) *Userspace {
	u := &Userspace{cfg: cfg, ctr: cfg.Counters, log: cfg.Logger}
	u.vni = [3]byte{byte(cfg.VNI >> 16), byte(cfg.VNI >> 8), byte(cfg.VNI)}
	u.peers.Store(&peerSet{})
	u.senders = pool.New(runtime.GOMAXPROCS(0), func() *vsender { return newVSender(u) })
	return u
}

// SetPeers replaces the peers. Frames to any other endpoint are dropped;
// datagrams from any other address too.
func (u *Userspace) SetPeers(eps []Endpoint) {
	ps := &peerSet{byAddr: make(map[netip.AddrPort]*peerHdr, len(eps)), byIP: make(map[netip.Addr]netip.AddrPort, len(eps))}
	for _, e := range eps {
		a := netip.AddrPortFrom(e.Addr.Addr().Unmap(), e.Addr.Port())
		h := &peerHdr{}
		for i, b := range []*[EncapLen]byte{&h.v4, &h.v6} {
			b[0] = flagI
			copy(b[4:7], u.vni[:])
			copy(b[HeaderLen:], e.MAC)
			copy(b[HeaderLen+6:], u.cfg.MAC)
			et := uint16(etherTypeIPv4)
			if i == 1 {
				et = etherTypeIPv6
			}
			binary.BigEndian.PutUint16(b[HeaderLen+12:], et)
		}
		ps.byAddr[a] = h
		ps.byIP[a.Addr()] = a
	}
	u.peers.Store(ps)
}

// Serves reports whether a is a VXLAN peer's endpoint.
func (u *Userspace) Serves(a netip.AddrPort) bool { return u.peers.Load().byAddr[a] != nil }

// SetMTU follows an underlay MTU change.
func (u *Userspace) SetMTU(mtu int) { u.socks.SetMTU(mtu) }

// Close implements tunnel.Transport.
func (u *Userspace) Close() error {
	if u.closed.Swap(true) {
		return nil
	}
	return u.socks.Close()
}

// Send implements tunnel.Transport.
// Safe for concurrent use: each call sends with a sender of its own.
func (u *Userspace) Send(frames []tunnel.Frame) error {
	s := u.senders.Get()
	defer u.senders.Put(s)
	return s.send(frames)
}

// Receivers implements tunnel.Transport.
func (u *Userspace) Receivers() []tunnel.ReceiveFunc {
	var fns []tunnel.ReceiveFunc
	for _, s := range u.socks {
		fns = append(fns, newVReceiver(u, s.BC.ReadBatch).receive)
	}
	return fns
}
