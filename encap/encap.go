// Package encap is the seam between a node and the backends it speaks.
// A backend (udp, host-gw, VXLAN, WireGuard: each a package of its own
// under encap/) is a Backend: its flags, its capability as a node
// publishes it in its lease, how two nodes' capabilities meet (a Path),
// and what it runs on a node once started (Running). Table lists the
// backends in preference order; encap/backends holds the one tulled
// runs, and nothing else names a backend.
//
// Select is a pure function of this node's facts, the table and the
// peer's lease, so both ends of a pair reach the same answer and every
// rule is table-tested without root. Mux presents the running backends'
// userspace transports to the datapath as one tunnel.Transport. The
// package reads leases; it never stores them and never touches the TUN
// device.
package encap

import (
	"encoding/json"
	"flag"
	"log/slog"
	"net/netip"
	"slices"

	"github.com/tulle-net/tulle/internal/api"
	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/lease"
	"github.com/tulle-net/tulle/tunnel"
)

// Auto is net-conf's Backend.Type that lets Select choose per peer.
const Auto = netconf.BackendAuto

// Backend is one way of reaching peers: a row of a Table. Its methods
// are what a node asks of it before anything runs.
type Backend interface {
	// Name is the backend's name in net-conf, capabilities and status.
	Name() string
	// Best is the fastest class of path it gives (auto mode's order).
	Best() Class
	// AddFlags registers its command-line flags (named after it).
	AddFlags(fs *flag.FlagSet)
	// Check validates its flags against net-conf once parsed: a
	// *netconf.ConfigError naming the flag, nothing created.
	Check(c *netconf.Config) error
	// Parse reads a capability as a peer published it; the error says
	// what is wrong with it.
	Parse(raw json.RawMessage) (Capability, error)
	// Start probes the node and starts the backend on it, as far as its
	// capability needs (Running.Attach does the rest once the lease is
	// held): nil (and no error) when the node does not speak it in this
	// configuration.
	// Errors are *netconf.ConfigError for configuration the node cannot
	// honour; nothing of the backend stays on an error.
	Start(env Env) (Running, error)
	// Cleanup removes what it leaves on the node between runs (tulled
	// cleanup). Already gone is success.
	Cleanup() error
}

// Legacy is a Backend that tulleds from before capabilities spoke: a
// peer without capabilities speaks it when its lease's one backend
// (lease.Attrs.Backend) says so, and this node names it there.
type Legacy interface {
	FromLegacy(lease.Backend) (Capability, bool)
}

// Capability is one backend as one node speaks it: what it publishes in
// its lease (as JSON), and, for this node's own, how it meets a peer's.
type Capability interface {
	// Reach says how a node speaking the backend as this reaches the peer
	// of pair speaking it as theirs (the same backend's, from Parse): a
	// path, or why there is none.
	Reach(theirs Capability, pair Pair) (Path, string)
}

// Class ranks paths in auto mode, fastest first.
type Class int

const (
	// Routed paths are plain routes: no encapsulation.
	Routed Class = iota
	// Kernel paths are encapsulated by both ends' kernels.
	Kernel
	// Userspace paths are encapsulated by a datapath at one end at least.
	Userspace
	// Forced paths are never chosen by auto mode, only when net-conf's
	// Backend.Type names the backend (WireGuard: a node either encrypts
	// everything or nothing).
	Forced
)

// Path is how this node reaches one peer with one backend.
type Path struct {
	Class Class
	// Endpoint is where the datapath sends the peer's frames (a userspace
	// path); invalid for a kernel path.
	Endpoint netip.AddrPort
	// Fallback: the datapath may carry a peer whose chosen path is a
	// kernel one by this path while the kernel's routes are missing.
	Fallback bool
	// Userspace is set when this node speaks a backend from its datapath
	// that it could speak through its kernel (status).
	Userspace bool
	// Reason replaces auto mode's "fastest both speak (…)" when set.
	Reason string
	// Note is added to the reason in every mode.
	Note string
	// Slower says why the path is of a slower class than the backend's
	// best (auto mode names it when it passes over it).
	Slower string
	// Peer is the backend's own programming of the peer: its Running's
	// SetPeers reads it.
	Peer any
}

// Pair is the underlay between this node and a peer.
type Pair struct {
	// IP4 and IP6 are this node's underlay addresses (either may be
	// invalid).
	IP4, IP6 netip.Addr
	// OnLink are the prefixes directly connected to the underlay
	// interface (no gateway): a peer inside one is on the same L2 segment.
	OnLink []netip.Prefix
	// Peer is the peer's lease.
	Peer lease.Peer
}

// Endpoint is the peer's address at port in the first family both ends
// have (IPv4 first); invalid when they share none.
func (p Pair) Endpoint(port uint16) netip.AddrPort {
	switch {
	case p.IP4.IsValid() && p.Peer.Attrs.PublicIP.IsValid():
		return netip.AddrPortFrom(p.Peer.Attrs.PublicIP, port)
	case p.IP6.IsValid() && p.Peer.Attrs.PublicIPv6.IsValid():
		return netip.AddrPortFrom(p.Peer.Attrs.PublicIPv6, port)
	}
	return netip.AddrPort{}
}

// Primary is the peer's underlay address in this node's primary family
// (IPv4 when it has one); invalid when the peer has none.
func (p Pair) Primary() netip.Addr {
	if p.IP4.IsValid() {
		return p.Peer.Attrs.PublicIP
	}
	return p.Peer.Attrs.PublicIPv6
}

// SameSegment returns the peer's address of mine's family, and the prefix,
// when both lie in one of this node's on-link prefixes.
func (p Pair) SameSegment(mine netip.Addr) (netip.Addr, netip.Prefix) {
	theirs := p.Peer.Attrs.PublicIP
	if mine.Is6() {
		theirs = p.Peer.Attrs.PublicIPv6
	}
	if !mine.IsValid() || !theirs.IsValid() {
		return netip.Addr{}, netip.Prefix{}
	}
	i := slices.IndexFunc(p.OnLink, func(o netip.Prefix) bool { return o.Contains(theirs) && o.Contains(mine) })
	if i < 0 {
		return netip.Addr{}, netip.Prefix{}
	}
	return theirs, p.OnLink[i]
}

// Underlay is where this node's datagrams leave from.
type Underlay struct {
	Iface    string
	MTU      int
	IP4, IP6 netip.Addr
	// OnLink are the prefixes directly connected on the interface.
	OnLink []netip.Prefix
}

// Primary6 reports whether the node's primary underlay family is IPv6
// (it has no IPv4 address): the family its headers are sized for.
func (u Underlay) Primary6() bool { return !u.IP4.IsValid() }

// Env is what a backend starts with.
type Env struct {
	// Node is this node's name.
	Node string
	// Net is the parsed net-conf.
	Net      *netconf.Config
	Underlay Underlay
	// DisableGSO and DisableGRO turn UDP segmentation offloads off for
	// userspace backends.
	DisableGSO, DisableGRO bool
	// Accept reports whether a datagram's source is a known peer's
	// endpoint (the datapath's peer table); a backend that serves any
	// peer may use it to drop strangers early.
	Accept func(netip.AddrPort) bool
	// Networks are the cluster networks (kernel paths prune routes in
	// them only).
	Networks []netip.Prefix
	Logger   *slog.Logger
}

// Running is a backend started on this node.
type Running interface {
	// Capability is what the node publishes of it now.
	Capability() Capability
	// Transport is its userspace path for the datapath, nil when it moves
	// no packets itself.
	Transport() Transport
	// Kernel is its kernel state for the router to reconcile, nil when it
	// has none.
	Kernel() tunnel.KernelPath
	// Sizes are the largest inner packet and the largest super-packet its
	// paths carry over an underlay of this MTU; 0 for no limit.
	Sizes(underlayMTU int) (mtu, gsoMax int)
	// Attach is called once the lease is held, with the node's subnets:
	// the backend takes what carrying traffic needs (a userspace path
	// that can always be spoken binds its sockets here, so a node that
	// may not claim its lease holds none). An error stops the node.
	Attach(subnets []netip.Prefix) error
	// SetPeers gives it the peers it serves, with their paths.
	SetPeers(as []Assignment)
	// SetMTU follows an underlay MTU change.
	SetMTU(underlayMTU int)
	// Counters are its counters for the status and the metrics.
	Counters() Counters
	// Close releases what it holds; kernel state stays for the next run.
	Close() error
}

// Counters are one part's counters: the status shows Values under
// their keys, the metrics under Component with Prefix cut.
type Counters struct {
	Component, Prefix string
	Values            map[string]uint64
}

// Reporter is a Running with more to say in the status document than
// its counters (WireGuard's keys and sessions).
type Reporter interface {
	Report(doc *api.Status)
}

// Rotator is a Running with a key to rotate (tullectl rotate-key): it
// returns the new key's description; the node republishes Capability.
type Rotator interface {
	RotateKey(now bool) (api.RotatedKey, error)
}

// Router is a Running that routes some peers through the kernel: the
// router installs PeerRoutes next to its own.
type Router interface {
	PeerRoutes() []tunnel.PeerRoute
}
