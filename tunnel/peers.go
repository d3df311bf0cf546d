package tunnel

import (
	"net/netip"
	"slices"
	"sync/atomic"
)

// Peer is a remote node as the datapath sees it.
type Peer struct {
	Name string
	// Addr is the underlay address its traffic goes to and comes from.
	Addr netip.AddrPort
	// Subnets are the inner prefixes the peer owns (its pod subnets).
	Subnets []netip.Prefix
	// Stats are its traffic; Set keeps them across snapshots by name.
	Stats *PeerStats
}

// PeerTable maps inner destinations to peers by longest-prefix match and
// underlay source addresses to peers. Lookups are lock-free and allocation
// free; Set swaps in a new immutable snapshot.
type PeerTable struct {
	snap atomic.Pointer[peerSnapshot]
}

type peerSnapshot struct {
	v4, v6 lpm
	byAddr map[netip.AddrPort]*Peer
	local  []netip.Prefix
	peers  []Peer
}

// lpm is a longest-prefix-match table: one exact-match map per distinct
// prefix length, probed longest first. Clusters use one or two subnet
// lengths, so a lookup is one or two map probes.
type lpm struct {
	lens []int // descending
	m    map[netip.Prefix]*Peer
}

func (t *lpm) insert(p netip.Prefix, peer *Peer) {
	if t.m == nil {
		t.m = map[netip.Prefix]*Peer{}
	}
	p = p.Masked()
	t.m[p] = peer
	if !slices.Contains(t.lens, p.Bits()) {
		t.lens = append(t.lens, p.Bits())
		slices.Sort(t.lens)
		slices.Reverse(t.lens)
	}
}

func (t *lpm) lookup(a netip.Addr) *Peer {
	for _, l := range t.lens {
		p, _ := a.Prefix(l)
		if peer, ok := t.m[p]; ok {
			return peer
		}
	}
	return nil
}

// NewPeerTable returns an empty table for a node owning the local subnets.
func NewPeerTable(local []netip.Prefix) *PeerTable {
	t := &PeerTable{}
	t.Set(local, nil)
	return t
}

// Set replaces the table's contents. Subnets that overlap a local subnet are
// ignored: a peer can never take traffic for this node's own pods.
func (t *PeerTable) Set(local []netip.Prefix, peers []Peer) {
	stats := map[string]*PeerStats{}
	if old := t.snap.Load(); old != nil {
		for i := range old.peers {
			stats[old.peers[i].Name] = old.peers[i].Stats
		}
	}
	s := &peerSnapshot{byAddr: map[netip.AddrPort]*Peer{}, local: slices.Clone(local), peers: make([]Peer, len(peers))}
	for i := range peers {
		p := &s.peers[i]
		*p = peers[i]
		if p.Stats = stats[p.Name]; p.Stats == nil {
			p.Stats = &PeerStats{}
		}
		p.Subnets = slices.DeleteFunc(slices.Clone(p.Subnets), func(n netip.Prefix) bool {
			return slices.ContainsFunc(local, n.Overlaps)
		})
		s.byAddr[unmap(p.Addr)] = p
		for _, n := range p.Subnets {
			if n.Addr().Is4() {
				s.v4.insert(n, p)
			} else {
				s.v6.insert(n, p)
			}
		}
	}
	t.snap.Store(s)
}

// Lookup returns the peer owning dst, or nil.
func (t *PeerTable) Lookup(dst netip.Addr) *Peer {
	s := t.snap.Load()
	if dst.Is4() {
		return s.v4.lookup(dst)
	}
	return s.v6.lookup(dst)
}

// ByAddr returns the peer whose underlay endpoint (address and port) is a,
// or nil. Only a peer's published endpoint counts: another port on a
// peer's host is any process there, not the peer's tulled.
func (t *PeerTable) ByAddr(a netip.AddrPort) *Peer {
	return t.snap.Load().byAddr[unmap(a)]
}

func unmap(a netip.AddrPort) netip.AddrPort { return netip.AddrPortFrom(a.Addr().Unmap(), a.Port()) }

// IsLocal reports whether a lies in one of this node's subnets.
func (t *PeerTable) IsLocal(a netip.Addr) bool {
	for _, p := range t.snap.Load().local {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// Local returns this node's subnets.
func (t *PeerTable) Local() []netip.Prefix { return slices.Clone(t.snap.Load().local) }

// Peers returns a copy of the current peers.
func (t *PeerTable) Peers() []Peer { return slices.Clone(t.snap.Load().peers) }

// Owns reports whether src lies in one of p's subnets.
func (p *Peer) Owns(src netip.Addr) bool {
	for _, n := range p.Subnets {
		if n.Contains(src) {
			return true
		}
	}
	return false
}

// PeerRoute is a route to a peer's subnet that bypasses the TUN: a kernel
// backend's path (host-gw: the peer's underlay address as next hop on the
// underlay interface). It is more specific than the TUN's cluster route, so
// longest-prefix match takes the peer's traffic off the userspace path, and
// removing it falls back to that path.
type PeerRoute struct {
	Dst netip.Prefix
	// Via is the next hop on the underlay, of Dst's family (Linux takes no
	// IPv4 next hop for an IPv6 route).
	Via netip.Addr
}
