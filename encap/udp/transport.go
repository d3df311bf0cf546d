package udp

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"runtime"
	"sync/atomic"

	"github.com/tulle-net/tulle/encap/internal/udpsock"
	"github.com/tulle-net/tulle/internal/pool"
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
	opt     Options
	ctr     *Counters
	log     *slog.Logger
	socks   udpsock.Sockets // IPv4 if bound, then IPv6
	senders *pool.Pool[sender]
	frameID atomic.Uint32
	closed  atomic.Bool
}

var _ tunnel.Transport = (*Transport)(nil)

// MaxPayload returns the largest UDP payload per datagram for an underlay
// of the given MTU and family.
func MaxPayload(mtu int, v6 bool) int { return udpsock.Payload(mtu, v6) }

// InnerMTU is the TUN MTU for an underlay MTU: the largest plain packet
// that fits one datagram with header and descriptor.
func InnerMTU(mtu int, v6 bool) int { return MaxPayload(mtu, v6) - Overhead }

// MaxFrame is the largest super-packet (the TUN's gso_max_size) whose
// train fits one UDP GSO send on an underlay of the given MTU: at most
// maxGSOSegments datagrams and maxGSOBytes bytes.
func MaxFrame(mtu int, v6 bool) int {
	dg := MaxPayload(mtu, v6)
	return min(min(udpsock.MaxGSOSegments, udpsock.MaxGSOBytes/dg)*(dg-HeaderLen)-DescLen, 65536)
}

// SetMTU follows an underlay MTU change: datagrams are cut to fit it from
// the next frame on (frames are carried whole, so a super-packet in flight
// just becomes a longer train).
func (t *Transport) SetMTU(mtu int) { t.socks.SetMTU(mtu) }

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
	t.senders = pool.New(runtime.GOMAXPROCS(0), func() *sender { return newSender(t) })
	return t, nil
}

func (t *Transport) listen(la netip.AddrPort) (*udpsock.Socket, error) {
	s, err := udpsock.ListenSteered(la, t.opt.DisableGSO, t.opt.DisableGRO, flagsOffset, FlagSparse)
	if err != nil {
		return nil, fmt.Errorf("udp transport: %w", err)
	}
	if s.NoSparse != nil {
		t.log.Warn("udp transport: sparse flows share the bulk socket", "addr", s.Name, "err", s.NoSparse)
	}
	s.SetMTU(t.opt.MTU)
	t.log.Info("udp transport listening", "addr", s.Name, "gso", s.GSO(), "gro", s.GRO, "max_datagram", s.MaxPayload())
	return s, nil
}

// LocalAddrs returns the bound addresses (with the chosen ports).
func (t *Transport) LocalAddrs() []netip.AddrPort {
	var out []netip.AddrPort
	for _, s := range t.socks {
		out = append(out, s.LocalAddr())
	}
	return out
}

// Close implements tunnel.Transport.
func (t *Transport) Close() error {
	if t.closed.Swap(true) {
		return nil
	}
	return t.socks.Close()
}

// Receivers implements tunnel.Transport.
func (t *Transport) Receivers() []tunnel.ReceiveFunc {
	var fns []tunnel.ReceiveFunc
	for _, s := range t.socks {
		r := newReceiver(t, s.BC.ReadBatch, s.GRO, false)
		fns = append(fns, r.receive)
		if s.Sparse != nil {
			r := newReceiver(t, s.Sparse.BC.ReadBatch, s.Sparse.GRO, true)
			fns = append(fns, r.receive)
		}
	}
	return fns
}

// Serves reports whether the transport can reach a: any endpoint of a
// family it has a socket for.
func (t *Transport) Serves(a netip.AddrPort) bool { return t.socks.For(a) != nil }
