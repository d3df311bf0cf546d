// Package hostgw is the host-gw backend: a peer on this node's L2 segment
// is reached by a plain route to its subnet via its underlay address, no
// encapsulation. It moves no packets; the node's router installs its
// routes next to its own (tunnel.Router).
package hostgw

import (
	"encoding/json"
	"flag"
	"net/netip"
	"strings"
	"sync"

	"github.com/tulle-net/tulle/encap"
	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/tunnel"
)

// Name is the backend's name in net-conf, capabilities and status.
const Name = netconf.BackendHostGW

// Caps is what a peer needs for host-gw: nothing beyond the node's
// underlay address.
type Caps struct{}

// Gateways are a peer's next hops: its underlay address of each family on
// this node's segment. The kernel takes no IPv4 next hop for an IPv6
// route, so a family without one (either may be invalid) stays on the
// fallback path.
type Gateways struct {
	Gateway4, Gateway6 netip.Addr
}

// Backend is the host-gw row of a table.
type Backend struct{}

var _ encap.Backend = Backend{}

// NewBackend returns the host-gw row of a table.
func NewBackend() Backend { return Backend{} }

func (Backend) Name() string                { return Name }
func (Backend) Best() encap.Class           { return encap.Routed }
func (Backend) AddFlags(*flag.FlagSet)      {}
func (Backend) Check(*netconf.Config) error { return nil }
func (Backend) Cleanup() error              { return nil } // the router's routes go with the TUN's

// Parse implements encap.Backend.
func (Backend) Parse(raw json.RawMessage) (encap.Capability, error) {
	var c Caps
	if err := json.Unmarshal(raw, &c); err != nil {
		return nil, err
	}
	return c, nil
}

// Reach implements encap.Capability: the peer must share a segment with
// this node in one family at least.
func (Caps) Reach(_ encap.Capability, pair encap.Pair) (encap.Path, string) {
	gw4, seg4 := pair.SameSegment(pair.IP4)
	gw6, seg6 := pair.SameSegment(pair.IP6)
	if !gw4.IsValid() && !gw6.IsValid() {
		return encap.Path{}, "the peer is not on this node's L2 segment"
	}
	var segs []string
	for _, s := range []netip.Prefix{seg4, seg6} {
		if s.IsValid() {
			segs = append(segs, s.String())
		}
	}
	p := encap.Path{Class: encap.Routed, Reason: "same L2 segment (" + strings.Join(segs, ", ") + ")", Peer: Gateways{gw4, gw6}}
	switch {
	case !gw4.IsValid():
		p.Note = "IPv4 subnet over udp: no IPv4 underlay on the segment"
	case !gw6.IsValid():
		p.Note = "IPv6 subnet over udp: no IPv6 underlay on the segment"
	}
	return p, ""
}

// Start implements encap.Backend: every node that does not encrypt
// speaks host-gw (plain routes need nothing but the kernel).
func (Backend) Start(encap.Env) (encap.Running, error) { return &running{}, nil }

// Routes are the routes that reach the peers of as: each subnet via the
// peer's gateway of its family.
func Routes(as []encap.Assignment) []tunnel.PeerRoute {
	var rs []tunnel.PeerRoute
	for _, a := range as {
		gws, _ := a.Path.Peer.(Gateways)
		for _, s := range a.Subnets {
			gw := gws.Gateway4
			if s.Addr().Is6() {
				gw = gws.Gateway6
			}
			if gw.IsValid() {
				rs = append(rs, tunnel.PeerRoute{Dst: s, Via: gw})
			}
		}
	}
	return rs
}

// running holds the routes of the last plan.
type running struct {
	mu     sync.Mutex
	routes []tunnel.PeerRoute
}

var _ encap.Router = (*running)(nil)

func (r *running) Capability() encap.Capability { return Caps{} }
func (r *running) Transport() encap.Transport   { return nil }
func (r *running) Kernel() tunnel.KernelPath    { return nil }
func (r *running) Sizes(int) (int, int)         { return 0, 0 }
func (r *running) Attach([]netip.Prefix) error  { return nil }
func (r *running) SetMTU(int)                   {}
func (r *running) Counters() encap.Counters     { return encap.Counters{Component: Name} }
func (r *running) Close() error                 { return nil }

func (r *running) SetPeers(as []encap.Assignment) {
	rs := Routes(as)
	r.mu.Lock()
	r.routes = rs
	r.mu.Unlock()
}

func (r *running) PeerRoutes() []tunnel.PeerRoute {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.routes
}
