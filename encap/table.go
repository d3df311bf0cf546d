package encap

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"strings"

	"github.com/tulle-net/tulle/lease"
	"github.com/tulle-net/tulle/tunnel"
)

// Table is the backends a node may speak, in preference order: within a
// class, auto mode prefers the earlier row.
type Table []Backend

// Lookup returns the backend of that name.
func (t Table) Lookup(name string) (Backend, bool) {
	i := slices.IndexFunc(t, func(b Backend) bool { return b.Name() == name })
	if i < 0 {
		return nil, false
	}
	return t[i], true
}

// Names lists the table's backends in caps, in preference order.
func (t Table) Names(caps map[string]Capability) []string {
	var n []string
	for _, b := range t {
		if caps[b.Name()] != nil {
			n = append(n, b.Name())
		}
	}
	return n
}

// Publish renders caps as lease capabilities (lease.Attrs.Backends).
func Publish(caps map[string]Capability) map[string]json.RawMessage {
	m := map[string]json.RawMessage{}
	for name, c := range caps {
		m[name], _ = json.Marshal(c)
	}
	return m
}

// Parse reads a peer's capabilities from its lease attributes. A peer
// without capabilities (a tulled from before them) speaks the one Legacy
// backend its Attrs.Backend names. Entries this table does not know are
// skipped (a newer peer); entries that do not parse are skipped and named
// in problems.
func (t Table) Parse(a lease.Attrs) (caps map[string]Capability, problems []string) {
	caps = map[string]Capability{}
	if len(a.Backends) == 0 {
		for _, b := range t {
			if l, ok := b.(Legacy); ok {
				if c, ok := l.FromLegacy(a.Backend); ok {
					caps[b.Name()] = c
				}
			}
		}
		return caps, nil
	}
	names := make([]string, 0, len(a.Backends))
	for name := range a.Backends {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		b, ok := t.Lookup(name)
		if !ok {
			continue // a backend of a newer tulle
		}
		c, err := b.Parse(a.Backends[name])
		if err != nil {
			problems = append(problems, fmt.Sprintf("capability %s: %v", name, err))
			continue
		}
		caps[name] = c
	}
	return caps, problems
}

// Local is what this node knows when choosing.
type Local struct {
	// Mode is net-conf's Backend.Type: auto, or the backend forced for
	// every peer.
	Mode string
	// Caps are the backends this node speaks, by name.
	Caps map[string]Capability
	// IP4 and IP6 are this node's underlay addresses (either may be
	// invalid).
	IP4, IP6 netip.Addr
	// OnLink are the prefixes directly connected to the underlay
	// interface (no gateway): a peer inside one is on the same L2 segment.
	OnLink []netip.Prefix
}

// Choice is how one peer is reached.
type Choice struct {
	// Backend serves the peer; "" when none can (Reason says why).
	Backend string
	Reason  string
	// Endpoint is where the datapath sends the peer's frames: the chosen
	// path's own, else (a kernel path, or none) the fallback's, whenever
	// both speak the fallback (udp).
	Endpoint netip.AddrPort
	// Userspace is set when this node speaks the chosen backend from its
	// datapath where it could speak it through its kernel.
	Userspace bool
	// Path is the chosen path (zero when none).
	Path Path
}

// reach is one backend's answer for one peer.
type reach struct {
	path Path
	why  string
	ok   bool
}

// Select chooses the backend for peer p. Both ends of a pair see the same
// facts (the same segment, the same capabilities), so they choose alike
// and traffic is symmetric.
func (t Table) Select(l Local, p lease.Peer) Choice {
	theirs, problems := t.Parse(p.Attrs)
	pair := Pair{IP4: l.IP4, IP6: l.IP6, OnLink: l.OnLink, Peer: p}
	reaches := make([]reach, len(t))
	for i, b := range t {
		n := b.Name()
		switch mine, th := l.Caps[n], theirs[n]; {
		case mine == nil:
			reaches[i].why = "this node does not speak " + n
		case th == nil:
			reaches[i].why = "the peer does not advertise " + n
		default:
			reaches[i].path, reaches[i].why = mine.Reach(th, pair)
			reaches[i].ok = reaches[i].why == ""
		}
	}
	var ch Choice
	for _, r := range reaches {
		if r.ok && r.path.Fallback {
			ch.Endpoint = r.path.Endpoint
			break
		}
	}
	chosen := -1
	forced := slices.IndexFunc(t, func(b Backend) bool { return b.Name() == l.Mode })
	var passed []string // auto: what was passed over, and why
	note := func(i int, why string) {
		if e := t[i].Name() + ": " + why; !slices.Contains(passed, e) {
			passed = append(passed, e)
		}
	}
	if l.Mode == Auto {
	classes:
		for class := Routed; class < Forced; class++ {
			for i, b := range t {
				switch r := reaches[i]; {
				case b.Best() > class:
				case !r.ok:
					note(i, r.why)
				case r.path.Class > class:
					note(i, r.path.Slower)
				default:
					chosen = i
					break classes
				}
			}
		}
	} else if forced >= 0 && reaches[forced].ok {
		chosen = forced
	}
	switch {
	case chosen >= 0:
		b, path := t[chosen].Name(), reaches[chosen].path
		ch.Backend, ch.Path, ch.Userspace = b, path, path.Userspace
		if path.Endpoint.IsValid() {
			ch.Endpoint = path.Endpoint
		}
		switch {
		case l.Mode != Auto:
			ch.Reason = "Backend.Type forces " + b
		case path.Reason != "":
			ch.Reason = path.Reason
		default:
			passed = slices.DeleteFunc(passed, func(e string) bool { return strings.HasPrefix(e, b+": ") })
			ch.Reason = "fastest both speak"
			if len(passed) > 0 {
				ch.Reason += " (" + strings.Join(passed, "; ") + ")"
			}
		}
		if path.Note != "" {
			ch.Reason += "; " + path.Note
		}
	case l.Mode != Auto:
		why := "this node does not speak " + l.Mode
		if forced >= 0 {
			why = reaches[forced].why
		}
		ch.Reason = "Backend.Type forces " + l.Mode + ", which cannot reach this peer: " + why
	default:
		ch.Reason = "no backend both speak: " + strings.Join(passed, "; ")
	}
	if len(problems) > 0 {
		ch.Reason += " [ignored " + strings.Join(problems, ", ") + "]"
	}
	return ch
}

// Assignment is one peer with its choice.
type Assignment struct {
	Peer lease.Peer
	Choice
	// Subnets are the peer's subnets this node routes to it: those that
	// overlap none of this node's own (Translate fills them).
	Subnets []netip.Prefix
}

// Plan chooses for every peer, in the snapshot's order.
func (t Table) Plan(l Local, peers []lease.Peer) []Assignment {
	out := make([]Assignment, 0, len(peers))
	for _, p := range peers {
		out = append(out, Assignment{Peer: p, Choice: t.Select(l, p)})
	}
	return out
}

// Programme is what a plan asks of the datapath and the backends.
type Programme struct {
	// Datapath are the peers with an endpoint: those a userspace path
	// serves, and the fallback of kernel-path peers while their routes
	// are missing.
	Datapath []tunnel.Peer
	// ByBackend are each backend's peers.
	ByBackend map[string][]Assignment
}

// Translate turns assignments into a Programme. A peer's subnet that
// overlaps one of this node's own subnets is never routed to the peer.
func Translate(local []netip.Prefix, as []Assignment) Programme {
	pr := Programme{ByBackend: map[string][]Assignment{}}
	for _, a := range as {
		a.Subnets = slices.DeleteFunc(a.Peer.Subnets(), func(s netip.Prefix) bool { return slices.ContainsFunc(local, s.Overlaps) })
		if a.Endpoint.IsValid() {
			pr.Datapath = append(pr.Datapath, tunnel.Peer{Name: a.Peer.Node, Addr: a.Endpoint, Subnets: a.Subnets})
		}
		if a.Backend != "" {
			pr.ByBackend[a.Backend] = append(pr.ByBackend[a.Backend], a)
		}
	}
	return pr
}
