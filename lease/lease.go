// Package lease defines what a node's subnet lease is, what tulled learns
// about its peers, and the small Store interface through which the daemon
// claims, renews and releases its lease and watches everyone else's.
//
// Stores (lease/local for single hosts, lease/kube for clusters) own the
// bookkeeping of who holds which subnet. They never touch the datapath: the
// daemon turns the peer sets they deliver into routes and peer-table entries.
package lease

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"time"
)

// Sentinel errors callers branch on.
var (
	// ErrExhausted means every subnet of the configured range is held.
	ErrExhausted = errors.New("no free subnet left in the configured range")
	// ErrLost means the lease was taken over by another node (it had
	// expired) or removed; the caller must claim again.
	ErrLost = errors.New("lease lost")
	// ErrInUse means another live tulled holds the node name: it renewed
	// the lease recently and publishes other underlay addresses. Two
	// daemons with one name would share one subnet and flip its peers'
	// view of where it is.
	ErrInUse = errors.New("node name held by another live tulled")
)

// RenewInterval is how often a holder renews a lease of the given TTL.
func RenewInterval(ttl time.Duration) time.Duration { return ttl / 3 }

// renewSlack is how late a live holder's renewal may be (a slow store, a
// retry) before the holder counts as gone.
const renewSlack = 30 * time.Second

// Backend is what a peer needs to know to reach a node's datapath.
type Backend struct {
	Type string `json:"type"`
	// Port is the UDP port of the udp (and wireguard) backends.
	Port uint16 `json:"port,omitempty"`
	// Data holds backend-specific attributes (VTEP MAC, WireGuard key).
	Data json.RawMessage `json:"data,omitempty"`
}

// Attrs are the attributes a node publishes with its lease.
type Attrs struct {
	PublicIP   netip.Addr `json:"publicIP,omitzero"`
	PublicIPv6 netip.Addr `json:"publicIPv6,omitzero"`
	// Backend is the one backend tulleds before capabilities read: every
	// node publishes the userspace udp backend here, so older peers keep
	// reaching it during an upgrade.
	Backend Backend `json:"backend"`
	// Backends are the node's capabilities: every backend it speaks, by
	// name, with the data a peer needs for it (JSON, the backend's own
	// shape). Older tulleds ignore the field; peers skip entries they do
	// not know or cannot parse.
	Backends map[string]json.RawMessage `json:"backends,omitempty"`
}

// Lease is a node's claim on one subnet per enabled address family.
type Lease struct {
	Node       string       `json:"node"`
	Subnet     netip.Prefix `json:"subnet,omitzero"`
	IPv6Subnet netip.Prefix `json:"ipv6Subnet,omitzero"`
	Attrs      Attrs        `json:"attrs"`
	Expiration time.Time    `json:"expiration"`
	// Renewed is when the holder last claimed or renewed the lease, by
	// the holder's clock.
	Renewed time.Time `json:"renewed,omitzero"`
}

// HeldByOther reports whether a live holder other than one publishing
// attrs has the lease (of lifetime ttl) at now: it renewed within one
// renewal interval (plus slack) and publishes other underlay addresses. A
// restart of the same node (same addresses), or a holder that stopped
// renewing, is not one.
func (l *Lease) HeldByOther(attrs Attrs, ttl time.Duration, now time.Time) bool {
	if l.Renewed.IsZero() || (l.Attrs.PublicIP == attrs.PublicIP && l.Attrs.PublicIPv6 == attrs.PublicIPv6) {
		return false
	}
	return ttl > 0 && now.Sub(l.Renewed) < RenewInterval(ttl)+renewSlack
}

// InUseError says which live tulled holds the node name, and where the
// refused one is.
func InUseError(l *Lease, attrs Attrs, now time.Time) error {
	return fmt.Errorf("%w: node %q is held by a tulled at %s (lease %s, renewed %s ago); this one is at %s: give each node its own --node-name",
		ErrInUse, l.Node, l.Attrs.Where(), l.Key(), now.Sub(l.Renewed).Round(time.Second), attrs.Where())
}

// Where names the underlay addresses the attributes publish.
func (a Attrs) Where() string {
	var s []string
	for _, ip := range []netip.Addr{a.PublicIP, a.PublicIPv6} {
		if ip.IsValid() {
			s = append(s, ip.String())
		}
	}
	if len(s) == 0 {
		return "no address"
	}
	return strings.Join(s, " and ")
}

// Subnets returns the lease's valid subnets, IPv4 first.
func (l *Lease) Subnets() []netip.Prefix {
	var s []netip.Prefix
	if l.Subnet.IsValid() {
		s = append(s, l.Subnet)
	}
	if l.IPv6Subnet.IsValid() {
		s = append(s, l.IPv6Subnet)
	}
	return s
}

// Key names the lease in a store: its IPv4 subnet, or its IPv6 subnet in an
// IPv6-only cluster.
func (l *Lease) Key() netip.Prefix {
	if l.Subnet.IsValid() {
		return l.Subnet
	}
	return l.IPv6Subnet
}

// Equal reports whether two leases carry the same data, ignoring expiry.
func (l *Lease) Equal(o *Lease) bool {
	return l.Node == o.Node && l.Subnet == o.Subnet && l.IPv6Subnet == o.IPv6Subnet &&
		l.Attrs.PublicIP == o.Attrs.PublicIP && l.Attrs.PublicIPv6 == o.Attrs.PublicIPv6 &&
		l.Attrs.Backend.Type == o.Attrs.Backend.Type && l.Attrs.Backend.Port == o.Attrs.Backend.Port &&
		slices.Equal(l.Attrs.Backend.Data, o.Attrs.Backend.Data) &&
		maps.EqualFunc(l.Attrs.Backends, o.Attrs.Backends, func(a, b json.RawMessage) bool { return slices.Equal(a, b) })
}

// Peer is another node's lease as seen by this node.
type Peer = Lease

// Store is the interface the daemon consumes. Implementations must be safe
// for concurrent use.
type Store interface {
	// Claim returns a lease for node carrying attrs. A node that still holds
	// a lease (even an expired one nobody took over) gets the same subnets
	// back, so pods keep their addresses across restarts.
	Claim(ctx context.Context, node string, attrs Attrs) (Lease, error)
	// Renew extends the lease and republishes its attributes. It returns
	// ErrLost when the lease is no longer the caller's.
	Renew(ctx context.Context, l Lease) (Lease, error)
	// Release gives the lease up. Releasing a lease that is already gone is
	// not an error.
	Release(ctx context.Context, l Lease) error
	// WatchPeers delivers the full set of other nodes' live leases, sorted by
	// key: once at start and again after every change, until ctx ends.
	// Consumers apply snapshots idempotently; a slow consumer only ever sees
	// the newest one.
	WatchPeers(ctx context.Context, self string) (<-chan []Peer, error)
}

// Lookuper is implemented by stores that can find a node's lease without
// claiming it (for cleanup).
type Lookuper interface {
	Lookup(ctx context.Context, node string) (Lease, bool, error)
}

// ReadyReporter is implemented by stores that depend on a remote service:
// Ready returns why the store is not ready, or nil.
type ReadyReporter interface {
	Ready() error
}

// SortPeers orders peers by key, the order WatchPeers delivers them in.
func SortPeers(p []Peer) {
	slices.SortFunc(p, func(a, b Peer) int {
		ka, kb := a.Key(), b.Key()
		if c := ka.Addr().Compare(kb.Addr()); c != 0 {
			return c
		}
		return ka.Bits() - kb.Bits()
	})
}

// PeersEqual reports whether two sorted peer sets carry the same data.
func PeersEqual(a, b []Peer) bool {
	return slices.EqualFunc(a, b, func(x, y Peer) bool { return x.Equal(&y) })
}
