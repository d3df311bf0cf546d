// Package encap knows how pod traffic reaches each peer: the backends tulle
// speaks, what a node advertises of them (its capabilities, carried in its
// lease), and which backend serves each peer. Select is a pure function of
// this node's facts and the peer's lease, so both ends of a pair reach the
// same answer and every rule is table-tested without root.
//
// Kernel backends (host-gw, the kernel's VXLAN) move no packets: tulled
// only programs routes, devices and entries for them (tunnel.Router,
// encap/vxlan.Kernel). Userspace backends (udp, VXLAN in userspace) move
// packets; Mux presents them to the datapath as one tunnel.Transport. The package reads leases; it never
// stores them and never touches the TUN device.
package encap

import (
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sort"
	"strings"

	"github.com/tulle-net/tulle/encap/vxlan"
	"github.com/tulle-net/tulle/encap/wireguard"
	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/lease"
	"github.com/tulle-net/tulle/tunnel"
)

// Backend names, as they appear in net-conf.json, capabilities and status.
const (
	UDP       = netconf.BackendUDP
	HostGW    = netconf.BackendHostGW
	VXLAN     = netconf.BackendVXLAN
	WireGuard = netconf.BackendWireGuard
	Auto      = netconf.BackendAuto
)

// preference orders the backends, fastest first: plain routes, the
// kernel's VXLAN, then the userspace datapath.
var preference = []string{HostGW, VXLAN, UDP, WireGuard}

// candidate is one step of auto mode's order.
type candidate struct {
	backend string
	// kernelOnly: VXLAN only when both ends' kernels speak it. VXLAN from a
	// datapath (either end) comes after udp, which a userspace path moves
	// faster.
	kernelOnly bool
}

// autoOrder is what auto mode tries, in order.
var autoOrder = []candidate{{HostGW, false}, {VXLAN, true}, {UDP, false}, {VXLAN, false}}

// Caps are the backends a node speaks. A nil entry is a backend it does not
// speak (or that did not parse).
type Caps struct {
	UDP       *UDPCaps
	HostGW    *HostGWCaps
	VXLAN     *VXLANCaps
	WireGuard *WireGuardCaps
}

// WireGuardCaps is what a peer needs for WireGuard: the node's port and
// public key (base64, as wg(8) shows it). A node configured for WireGuard
// publishes nothing else, so no peer ever reaches it in plaintext.
type WireGuardCaps struct {
	Port      uint16 `json:"port"`
	PublicKey string `json:"publicKey"`
}

// VXLANCaps is what a peer needs for VXLAN: the network identifier and
// port (both ends must agree) and this node's VTEP MAC. Userspace says the
// node speaks VXLAN from its datapath (encap/vxlan.Userspace) rather than
// through its kernel; absent, as tulleds before it published, it is the
// kernel.
type VXLANCaps struct {
	VNI       int    `json:"vni"`
	Port      int    `json:"port"`
	MAC       string `json:"mac"`
	Userspace bool   `json:"userspace,omitempty"`
}

// UDPCaps is what a peer needs for the udp backend.
type UDPCaps struct {
	Port uint16 `json:"port"`
}

// HostGWCaps is what a peer needs for host-gw: nothing beyond the node's
// underlay address.
type HostGWCaps struct{}

// Publish renders caps as lease capabilities (lease.Attrs.Backends).
func (c Caps) Publish() map[string]json.RawMessage {
	m := map[string]json.RawMessage{}
	if c.UDP != nil {
		m[UDP], _ = json.Marshal(c.UDP)
	}
	if c.HostGW != nil {
		m[HostGW], _ = json.Marshal(c.HostGW)
	}
	if c.VXLAN != nil {
		m[VXLAN], _ = json.Marshal(c.VXLAN)
	}
	if c.WireGuard != nil {
		m[WireGuard], _ = json.Marshal(c.WireGuard)
	}
	return m
}

// Names lists the backends in caps, in preference order.
func (c Caps) Names() []string {
	var n []string
	for _, b := range preference {
		if c.has(b) {
			n = append(n, b)
		}
	}
	return n
}

func (c Caps) has(b string) bool {
	switch b {
	case UDP:
		return c.UDP != nil
	case HostGW:
		return c.HostGW != nil
	case VXLAN:
		return c.VXLAN != nil
	case WireGuard:
		return c.WireGuard != nil
	}
	return false
}

// ParseCaps reads a peer's capabilities from its lease attributes. A peer
// without capabilities (a tulled from before them) speaks the one backend
// it publishes in Attrs.Backend. Entries this build does not know are
// skipped (a newer peer); entries that do not parse are skipped and named
// in problems.
func ParseCaps(a lease.Attrs) (c Caps, problems []string) {
	if len(a.Backends) == 0 {
		if a.Backend.Type == UDP && a.Backend.Port != 0 {
			c.UDP = &UDPCaps{Port: a.Backend.Port}
		}
		return c, nil
	}
	names := make([]string, 0, len(a.Backends))
	for name := range a.Backends {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		raw := a.Backends[name]
		var err error
		switch name {
		case UDP:
			var u UDPCaps
			if err = json.Unmarshal(raw, &u); err == nil && u.Port == 0 {
				err = fmt.Errorf("no port")
			}
			if err == nil {
				c.UDP = &u
			}
		case HostGW:
			var h HostGWCaps
			if err = json.Unmarshal(raw, &h); err == nil {
				c.HostGW = &h
			}
		case VXLAN:
			var v VXLANCaps
			if err = json.Unmarshal(raw, &v); err == nil {
				_, merr := net.ParseMAC(v.MAC)
				switch {
				case v.VNI < 1 || v.VNI > 1<<24-1:
					err = fmt.Errorf("VNI %d out of range", v.VNI)
				case v.Port < 1 || v.Port > 65535:
					err = fmt.Errorf("port %d out of range", v.Port)
				case merr != nil:
					err = fmt.Errorf("MAC %q: %v", v.MAC, merr)
				}
			}
			if err == nil {
				c.VXLAN = &v
			}
		case WireGuard:
			var w WireGuardCaps
			if err = json.Unmarshal(raw, &w); err == nil {
				var k wireguard.Key
				k, err = wireguard.ParseKey(w.PublicKey)
				switch {
				case err != nil:
					err = fmt.Errorf("public key %q: %v", w.PublicKey, err)
				case k.IsZero():
					err = fmt.Errorf("public key is all zeros")
				case w.Port == 0:
					err = fmt.Errorf("no port")
				}
			}
			if err == nil {
				c.WireGuard = &w
			}
		default:
			continue // a backend of a newer tulle
		}
		if err != nil {
			problems = append(problems, fmt.Sprintf("capability %s: %v", name, err))
		}
	}
	return c, problems
}

// Local is what this node knows when choosing.
type Local struct {
	// Mode is net-conf's Backend.Type: auto, or the backend forced for
	// every peer.
	Mode string
	// Caps are the backends this node speaks.
	Caps Caps
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
	// Endpoint is the peer's udp endpoint, set whenever both speak udp:
	// the userspace path, and the fallback while a kernel path's route is
	// missing.
	Endpoint netip.AddrPort
	// Gateway4 and Gateway6 are host-gw's next hops for the peer's IPv4
	// and IPv6 subnets: its underlay address of the same family on this
	// segment. The kernel takes no IPv4 next hop for an IPv6 route, so a
	// family without one (either may be invalid) stays on the udp path.
	Gateway4, Gateway6 netip.Addr
	// VTEP and MAC are the peer's VXLAN tunnel endpoint (its underlay
	// address in this node's VTEP family) and VTEP MAC.
	VTEP netip.Addr
	MAC  net.HardwareAddr
	// Userspace is set when this node speaks VXLAN to the peer from its
	// datapath; Endpoint is then the peer's VXLAN endpoint. Otherwise the
	// kernel's VXLAN device serves it, whichever way the peer speaks.
	Userspace bool
	// Key is the peer's WireGuard public key when WireGuard serves it;
	// Endpoint is then its WireGuard endpoint.
	Key wireguard.Key
}

// Select chooses the backend for peer p. Both ends of a pair see the same
// facts (the same segment, the same capabilities), so they choose alike
// and traffic is symmetric.
func Select(l Local, p lease.Peer) Choice {
	pc, problems := ParseCaps(p.Attrs)
	var ch Choice
	if l.Caps.UDP != nil && pc.UDP != nil {
		switch {
		case l.IP4.IsValid() && p.Attrs.PublicIP.IsValid():
			ch.Endpoint = netip.AddrPortFrom(p.Attrs.PublicIP, pc.UDP.Port)
		case l.IP6.IsValid() && p.Attrs.PublicIPv6.IsValid():
			ch.Endpoint = netip.AddrPortFrom(p.Attrs.PublicIPv6, pc.UDP.Port)
		}
	}
	if l.Caps.VXLAN != nil && pc.VXLAN != nil {
		// The VTEP family is this node's primary underlay family.
		if l.IP4.IsValid() {
			ch.VTEP = p.Attrs.PublicIP
		} else {
			ch.VTEP = p.Attrs.PublicIPv6
		}
		ch.MAC, _ = net.ParseMAC(pc.VXLAN.MAC)
	}
	if l.Caps.WireGuard != nil && pc.WireGuard != nil {
		switch {
		case l.IP4.IsValid() && p.Attrs.PublicIP.IsValid():
			ch.Endpoint = netip.AddrPortFrom(p.Attrs.PublicIP, pc.WireGuard.Port)
		case l.IP6.IsValid() && p.Attrs.PublicIPv6.IsValid():
			ch.Endpoint = netip.AddrPortFrom(p.Attrs.PublicIPv6, pc.WireGuard.Port)
		}
		ch.Key, _ = wireguard.ParseKey(pc.WireGuard.PublicKey)
	}
	gw4, seg4 := l.sameSegment(l.IP4, p.Attrs.PublicIP)
	gw6, seg6 := l.sameSegment(l.IP6, p.Attrs.PublicIPv6)
	why := map[string]string{}
	can := func(c candidate) bool {
		b := c.backend
		switch {
		case !l.Caps.has(b):
			why[b] = "this node does not speak " + b
		case !pc.has(b):
			why[b] = "the peer does not advertise " + b
		case b == HostGW && !gw4.IsValid() && !gw6.IsValid():
			why[b] = "the peer is not on this node's L2 segment"
		case (b == UDP || b == WireGuard) && !ch.Endpoint.IsValid():
			why[b] = "no underlay address in a family this node has"
		case b == VXLAN && (l.Caps.VXLAN.VNI != pc.VXLAN.VNI || l.Caps.VXLAN.Port != pc.VXLAN.Port):
			why[b] = fmt.Sprintf("VNI/port differ (here %d/%d, peer %d/%d)", l.Caps.VXLAN.VNI, l.Caps.VXLAN.Port, pc.VXLAN.VNI, pc.VXLAN.Port)
		case b == VXLAN && !ch.VTEP.IsValid():
			why[b] = "no peer underlay address in this node's VTEP family"
		case b == VXLAN && c.kernelOnly && l.Caps.VXLAN.Userspace:
			why[b] = "this node's VXLAN is in userspace"
		case b == VXLAN && c.kernelOnly && pc.VXLAN.Userspace:
			why[b] = "the peer's VXLAN is in userspace"
		default:
			return true
		}
		return false
	}
	tried := autoOrder
	if l.Mode != Auto {
		tried = []candidate{{backend: l.Mode}}
	}
	for i, c := range tried {
		if !can(c) {
			continue
		}
		b := c.backend
		ch.Backend = b
		switch {
		case l.Mode != Auto:
			ch.Reason = "Backend.Type forces " + b
		case b == HostGW:
			var segs []string
			for _, s := range []netip.Prefix{seg4, seg6} {
				if s.IsValid() {
					segs = append(segs, s.String())
				}
			}
			ch.Reason = "same L2 segment (" + strings.Join(segs, ", ") + ")"
		default:
			var not []string
			for _, o := range tried[:i] {
				if o.backend != b && !slices.Contains(not, o.backend+": "+why[o.backend]) {
					not = append(not, o.backend+": "+why[o.backend])
				}
			}
			ch.Reason = "fastest both speak"
			if len(not) > 0 {
				ch.Reason += " (" + strings.Join(not, "; ") + ")"
			}
		}
		if b != VXLAN {
			ch.VTEP, ch.MAC = netip.Addr{}, nil
		}
		if b != WireGuard {
			ch.Key = wireguard.Key{}
		}
		if b == VXLAN && l.Caps.VXLAN.Userspace {
			ch.Userspace = true
			ch.Endpoint = netip.AddrPortFrom(ch.VTEP, uint16(pc.VXLAN.Port))
			ch.Reason += "; VXLAN in userspace"
		}
		if b == HostGW {
			ch.Gateway4, ch.Gateway6 = gw4, gw6
			switch {
			case !gw4.IsValid():
				ch.Reason += "; IPv4 subnet over udp: no IPv4 underlay on the segment"
			case !gw6.IsValid():
				ch.Reason += "; IPv6 subnet over udp: no IPv6 underlay on the segment"
			}
		}
		break
	}
	if ch.Backend == "" {
		if l.Caps.UDP == nil {
			// Never a plaintext endpoint for a peer WireGuard cannot reach.
			ch.Endpoint, ch.Key = netip.AddrPort{}, wireguard.Key{}
		}
		var r []string
		for _, c := range tried {
			if e := c.backend + ": " + why[c.backend]; !slices.Contains(r, e) {
				r = append(r, e)
			}
		}
		ch.Reason = "no backend both speak: " + strings.Join(r, "; ")
		if l.Mode != Auto {
			ch.Reason = "Backend.Type forces " + l.Mode + ", which cannot reach this peer: " + why[l.Mode]
		}
	}
	if len(problems) > 0 {
		ch.Reason += " [ignored " + strings.Join(problems, ", ") + "]"
	}
	return ch
}

// sameSegment returns theirs, and the prefix, when it lies in one of this
// node's on-link prefixes together with mine.
func (l Local) sameSegment(mine, theirs netip.Addr) (netip.Addr, netip.Prefix) {
	if !mine.IsValid() || !theirs.IsValid() {
		return netip.Addr{}, netip.Prefix{}
	}
	i := slices.IndexFunc(l.OnLink, func(p netip.Prefix) bool { return p.Contains(theirs) && p.Contains(mine) })
	if i < 0 {
		return netip.Addr{}, netip.Prefix{}
	}
	return theirs, l.OnLink[i]
}

// Assignment is one peer with its choice.
type Assignment struct {
	Peer lease.Peer
	Choice
}

// Plan chooses for every peer, in the snapshot's order.
func Plan(l Local, peers []lease.Peer) []Assignment {
	out := make([]Assignment, 0, len(peers))
	for _, p := range peers {
		out = append(out, Assignment{Peer: p, Choice: Select(l, p)})
	}
	return out
}

// Programme is what a plan asks of the datapath and the kernel.
type Programme struct {
	// Userspace are the peers with a udp endpoint: those the userspace
	// path serves, and the fallback of kernel-path peers while their
	// routes are missing.
	Userspace []tunnel.Peer
	// Routes are the kernel paths' routes (host-gw).
	Routes []tunnel.PeerRoute
	// VXLAN are the peers the kernel's VXLAN device serves.
	VXLAN []vxlan.Peer
	// UserVXLAN are the peers userspace VXLAN serves (also in Userspace,
	// by the same endpoint).
	UserVXLAN []vxlan.Endpoint
	// WireGuard are the peers WireGuard serves (also in Userspace, by the
	// same endpoint).
	WireGuard []wireguard.PeerConfig
}

// Translate turns assignments into a Programme. A peer's subnet that
// overlaps one of this node's own subnets is never routed to the peer.
func Translate(local []netip.Prefix, as []Assignment) Programme {
	var pr Programme
	for _, a := range as {
		subnets := slices.DeleteFunc(a.Peer.Subnets(), func(s netip.Prefix) bool { return slices.ContainsFunc(local, s.Overlaps) })
		if a.Endpoint.IsValid() {
			pr.Userspace = append(pr.Userspace, tunnel.Peer{Name: a.Peer.Node, Addr: a.Endpoint, Subnets: subnets})
		}
		switch {
		case a.Backend == WireGuard:
			pr.WireGuard = append(pr.WireGuard, wireguard.PeerConfig{Name: a.Peer.Node, Key: a.Key, Endpoint: a.Endpoint, Subnets: subnets})
		case a.Backend == VXLAN && a.Userspace:
			pr.UserVXLAN = append(pr.UserVXLAN, vxlan.Endpoint{Addr: a.Endpoint, MAC: a.MAC})
		case a.Backend == VXLAN && len(subnets) > 0:
			pr.VXLAN = append(pr.VXLAN, vxlan.Peer{Subnets: subnets, VTEP: a.VTEP, MAC: a.MAC})
		}
		if a.Backend == HostGW {
			for _, s := range subnets {
				gw := a.Gateway4
				if s.Addr().Is6() {
					gw = a.Gateway6
				}
				if gw.IsValid() {
					pr.Routes = append(pr.Routes, tunnel.PeerRoute{Dst: s, Via: gw})
				}
			}
		}
	}
	return pr
}
