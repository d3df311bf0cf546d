package backends

import (
	"encoding/json"
	"net"
	"net/netip"
	"strings"
	"testing"

	"github.com/tulle-net/tulle/encap"
	"github.com/tulle-net/tulle/encap/hostgw"
	"github.com/tulle-net/tulle/encap/udp"
	"github.com/tulle-net/tulle/encap/vxlan"
	"github.com/tulle-net/tulle/encap/wireguard"
	"github.com/tulle-net/tulle/lease"
)

// The table's backend names, as the tests before it spelled them.
const (
	Auto      = encap.Auto
	UDP       = udp.Name
	HostGW    = hostgw.Name
	VXLAN     = vxlan.Name
	WireGuard = wireguard.Name
)

type (
	Local      = encap.Local
	Choice     = encap.Choice
	Assignment = encap.Assignment
	Caps       = map[string]encap.Capability
)

var table = New()

// Select is the table's.
func Select(l Local, p lease.Peer) Choice { return table.Select(l, p) }

// with returns l speaking c as well (a copy: the cases share l's map).
func with(l Local, name string, c encap.Capability) Local {
	caps := Caps{}
	for k, v := range l.Caps {
		caps[k] = v
	}
	if c == nil {
		delete(caps, name)
	} else {
		caps[name] = c
	}
	l.Caps = caps
	return l
}

// gateways are host-gw's next hops in a choice.
func gateways(ch Choice) hostgw.Gateways {
	g, _ := ch.Path.Peer.(hostgw.Gateways)
	return g
}

func peer(ip4, ip6 string, backends map[string]string) lease.Peer {
	p := lease.Peer{Node: "p", Attrs: lease.Attrs{Backend: lease.Backend{Type: UDP, Port: 8285}}}
	if ip4 != "" {
		p.Attrs.PublicIP = netip.MustParseAddr(ip4)
	}
	if ip6 != "" {
		p.Attrs.PublicIPv6 = netip.MustParseAddr(ip6)
	}
	if backends != nil {
		p.Attrs.Backends = map[string]json.RawMessage{}
		for k, v := range backends {
			p.Attrs.Backends[k] = json.RawMessage(v)
		}
	}
	return p
}

// withVXLAN gives the local node kernel VXLAN (VNI 1, port 8472).
func withVXLAN(l Local) Local {
	return with(l, VXLAN, vxlan.Caps{VNI: 1, Port: 8472, MAC: "02:00:00:00:00:01"})
}

// withUserVXLAN gives the local node VXLAN in userspace.
func withUserVXLAN(l Local) Local {
	return with(l, VXLAN, vxlan.Caps{VNI: 1, Port: 8472, MAC: "02:00:00:00:00:01", Userspace: true})
}

// vx is a peer's full capability set with the given VXLAN entry.
func vx(v string) map[string]string {
	return map[string]string{"udp": `{"port":8286}`, "host-gw": `{}`, "vxlan": v}
}

func TestSelect(t *testing.T) {
	both := Caps{UDP: udp.Caps{Port: 8285}, HostGW: hostgw.Caps{}}
	local := Local{Mode: Auto, Caps: both, IP4: netip.MustParseAddr("198.18.0.1"), IP6: netip.MustParseAddr("fd00:198::1"),
		OnLink: []netip.Prefix{netip.MustParsePrefix("198.18.0.0/24"), netip.MustParsePrefix("fd00:198::/64")}}
	full := map[string]string{"udp": `{"port":8286}`, "host-gw": `{}`}
	tests := []struct {
		name     string
		local    func(l Local) Local
		peer     lease.Peer
		backend  string
		endpoint string
		gateway  string
		reason   string
	}{
		{"same segment: host-gw", nil, peer("198.18.0.2", "fd00:198::2", full), HostGW, "198.18.0.2:8286", "198.18.0.2 fd00:198::2", "same L2 segment (198.18.0.0/24, fd00:198::/64)"},
		{"same segment, IPv4 underlay only", nil, peer("198.18.0.2", "", full), HostGW, "198.18.0.2:8286", "198.18.0.2", "IPv6 subnet over udp"},
		{"same segment over IPv6 only", func(l Local) Local { l.IP4 = netip.Addr{}; return l }, peer("", "fd00:198::2", full), HostGW, "[fd00:198::2]:8286", "fd00:198::2", "same L2 segment (fd00:198::/64); IPv4 subnet over udp"},
		{"behind a router: udp", nil, peer("198.19.1.2", "", full), UDP, "198.19.1.2:8286", "", "the peer is not on this node's L2 segment"},
		{"older tulled without capabilities: udp", nil, peer("198.18.0.2", "", nil), UDP, "198.18.0.2:8285", "", "the peer does not advertise host-gw"},
		{"this node turned host-gw off", func(l Local) Local { return with(l, HostGW, nil) }, peer("198.18.0.2", "", full), UDP, "198.18.0.2:8286", "", "this node does not speak host-gw"},
		{"forced udp on one segment", func(l Local) Local { l.Mode = UDP; return l }, peer("198.18.0.2", "", full), UDP, "198.18.0.2:8286", "", "Backend.Type forces udp"},
		{"forced host-gw across a router", func(l Local) Local { l.Mode = HostGW; return l }, peer("198.19.1.2", "", full), "", "198.19.1.2:8286", "", "Backend.Type forces host-gw, which cannot reach this peer: the peer is not on this node's L2 segment"},
		{"no common family", func(l Local) Local { l.IP6 = netip.Addr{}; return l }, peer("", "fd00:198::2", full), "", "", "", "no underlay address in a family this node has"},
		{"malformed udp capability, host-gw still used", nil, peer("198.18.0.2", "", map[string]string{"udp": `{"port":"x"}`, "host-gw": `{}`}), HostGW, "", "198.18.0.2", "ignored capability udp"},
		{"unknown capability of a newer peer is skipped", nil, peer("198.18.0.2", "", map[string]string{"udp": `{"port":8286}`, "warp": `{"x":1}`}), UDP, "198.18.0.2:8286", "", "the peer does not advertise host-gw"},
		{"udp capability without a port", nil, peer("198.19.1.2", "", map[string]string{"udp": `{}`}), "", "", "", "capability udp: no port"},
		{"kernel VXLAN across a router", withVXLAN, peer("198.19.1.2", "", vx(`{"vni":1,"port":8472,"mac":"02:00:00:00:00:02"}`)), VXLAN, "198.19.1.2:8286", "", "fastest both speak (host-gw: the peer is not on this node's L2 segment)"},
		{"host-gw beats VXLAN on one segment", withVXLAN, peer("198.18.0.2", "", vx(`{"vni":1,"port":8472,"mac":"02:00:00:00:00:02"}`)), HostGW, "198.18.0.2:8286", "198.18.0.2", "same L2 segment"},
		{"VXLAN with another VNI: udp", withVXLAN, peer("198.19.1.2", "", vx(`{"vni":2,"port":8472,"mac":"02:00:00:00:00:02"}`)), UDP, "198.19.1.2:8286", "", "VNI/port differ (here 1/8472, peer 2/8472)"},
		{"VXLAN capability with a bad MAC is skipped", withVXLAN, peer("198.19.1.2", "", vx(`{"vni":1,"port":8472,"mac":"nope"}`)), UDP, "198.19.1.2:8286", "", "ignored capability vxlan"},
		{"userspace VXLAN here, kernel there: udp", withUserVXLAN, peer("198.19.1.2", "", vx(`{"vni":1,"port":8472,"mac":"02:00:00:00:00:02"}`)), UDP, "198.19.1.2:8286", "", "vxlan: this node's VXLAN is in userspace"},
		{"kernel VXLAN here, userspace there: udp", withVXLAN, peer("198.19.1.2", "", vx(`{"vni":1,"port":8472,"mac":"02:00:00:00:00:02","userspace":true}`)), UDP, "198.19.1.2:8286", "", "vxlan: the peer's VXLAN is in userspace"},
		{"a VXLAN-only peer (flannel's kernel): userspace VXLAN", withUserVXLAN, peer("198.19.1.2", "", map[string]string{"vxlan": `{"vni":1,"port":8472,"mac":"02:00:00:00:00:02"}`}), VXLAN, "198.19.1.2:8472", "", "udp: the peer does not advertise udp); VXLAN in userspace"},
		{"forced VXLAN from userspace to a kernel", func(l Local) Local { l = withUserVXLAN(l); l.Mode = VXLAN; return l }, peer("198.19.1.2", "", vx(`{"vni":1,"port":8472,"mac":"02:00:00:00:00:02"}`)), VXLAN, "198.19.1.2:8472", "", "forces vxlan; VXLAN in userspace"},
		{"forced VXLAN from a kernel to userspace: the kernel device", func(l Local) Local { l = withVXLAN(l); l.Mode = VXLAN; return l }, peer("198.19.1.2", "", vx(`{"vni":1,"port":8472,"mac":"02:00:00:00:00:02","userspace":true}`)), VXLAN, "198.19.1.2:8286", "", "Backend.Type forces vxlan"},
		{"forced VXLAN, the peer lacks it", func(l Local) Local { l = withVXLAN(l); l.Mode = VXLAN; return l }, peer("198.19.1.2", "", full), "", "198.19.1.2:8286", "", "the peer does not advertise vxlan"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := local
			if tt.local != nil {
				l = tt.local(l)
			}
			ch := Select(l, tt.peer)
			if ch.Backend != tt.backend {
				t.Errorf("backend = %q (%s), want %q", ch.Backend, ch.Reason, tt.backend)
			}
			if got := addrPortString(ch.Endpoint); got != tt.endpoint {
				t.Errorf("endpoint = %q, want %q", got, tt.endpoint)
			}
			if got := strings.TrimSpace(addrString(gateways(ch).Gateway4) + " " + addrString(gateways(ch).Gateway6)); got != tt.gateway {
				t.Errorf("gateway = %q, want %q", got, tt.gateway)
			}
			if !strings.Contains(ch.Reason, tt.reason) {
				t.Errorf("reason = %q, want it to say %q", ch.Reason, tt.reason)
			}
		})
	}
}

// TestSelectIsSymmetric: both ends of a pair choose the same backend.
func TestSelectIsSymmetric(t *testing.T) {
	onlink := []netip.Prefix{netip.MustParsePrefix("198.18.0.0/24")}
	caps := Caps{UDP: udp.Caps{Port: 8285}, HostGW: hostgw.Caps{}}
	a := Local{Mode: Auto, Caps: caps, IP4: netip.MustParseAddr("198.18.0.1"), OnLink: onlink}
	b := Local{Mode: Auto, Caps: caps, IP4: netip.MustParseAddr("198.18.0.2"), OnLink: onlink}
	la := lease.Peer{Node: "a", Attrs: lease.Attrs{PublicIP: a.IP4, Backend: lease.Backend{Type: UDP, Port: 8285}, Backends: encap.Publish(a.Caps)}}
	lb := lease.Peer{Node: "b", Attrs: lease.Attrs{PublicIP: b.IP4, Backend: lease.Backend{Type: UDP, Port: 8285}, Backends: encap.Publish(b.Caps)}}
	if x, y := Select(a, lb).Backend, Select(b, la).Backend; x != y || x != HostGW {
		t.Fatalf("a→b %q, b→a %q; want host-gw both ways", x, y)
	}
	b = with(b, HostGW, nil)
	lb.Attrs.Backends = encap.Publish(b.Caps)
	if x, y := Select(a, lb).Backend, Select(b, la).Backend; x != y || x != UDP {
		t.Fatalf("with host-gw off on b: a→b %q, b→a %q; want udp both ways", x, y)
	}
}

// TestSelectIsSymmetricWithVXLAN: every mix of kernel and userspace VXLAN,
// auto and forced, chooses alike at both ends, and a userspace end uses
// the datapath while a kernel end uses its device.
func TestSelectIsSymmetricWithVXLAN(t *testing.T) {
	for _, mode := range []string{Auto, VXLAN} {
		for _, ua := range []bool{false, true} {
			for _, ub := range []bool{false, true} {
				mk := func(ip string, mac string, user bool) (Local, lease.Peer) {
					l := Local{Mode: mode, IP4: netip.MustParseAddr(ip), Caps: Caps{UDP: udp.Caps{Port: 8285}, HostGW: hostgw.Caps{},
						VXLAN: vxlan.Caps{VNI: 1, Port: 8472, MAC: mac, Userspace: user}}}
					return l, lease.Peer{Node: ip, Attrs: lease.Attrs{PublicIP: l.IP4, Backend: lease.Backend{Type: UDP, Port: 8285}, Backends: encap.Publish(l.Caps)}}
				}
				a, la := mk("198.18.0.1", "02:00:00:00:00:01", ua)
				b, lb := mk("198.19.0.1", "02:00:00:00:00:02", ub)
				x, y := Select(a, lb), Select(b, la)
				want := UDP
				if mode == VXLAN || (!ua && !ub) {
					want = VXLAN
				}
				if x.Backend != want || y.Backend != want {
					t.Errorf("mode %s, userspace a=%v b=%v: a→b %s, b→a %s; want %s", mode, ua, ub, x.Backend, y.Backend, want)
				}
				if want == VXLAN && (x.Userspace != ua || y.Userspace != ub) {
					t.Errorf("mode %s, userspace a=%v b=%v: datapath a=%v b=%v", mode, ua, ub, x.Userspace, y.Userspace)
				}
			}
		}
	}
}

func TestPublishParseRoundTrip(t *testing.T) {
	c := Caps{UDP: udp.Caps{Port: 9000}, HostGW: hostgw.Caps{}}
	got, problems := table.Parse(lease.Attrs{Backends: encap.Publish(c)})
	if u, ok := got[UDP].(udp.Caps); len(problems) != 0 || !ok || u.Port != 9000 || got[HostGW] == nil {
		t.Fatalf("round trip: %+v %v", got, problems)
	}
	if n := strings.Join(table.Names(got), ","); n != "host-gw,udp" {
		t.Errorf("names = %s", n)
	}
}

func addrPortString(a netip.AddrPort) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

func addrString(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

func TestTranslate(t *testing.T) {
	local := []netip.Prefix{netip.MustParsePrefix("100.96.1.0/24"), netip.MustParsePrefix("fd00:96:0:1::/64")}
	mk := func(node, v4, v6 string) lease.Peer {
		p := lease.Peer{Node: node}
		if v4 != "" {
			p.Subnet = netip.MustParsePrefix(v4)
		}
		if v6 != "" {
			p.IPv6Subnet = netip.MustParsePrefix(v6)
		}
		return p
	}
	as := []Assignment{
		{Peer: mk("gw", "100.96.2.0/24", "fd00:96:0:2::/64"), Choice: Choice{Backend: HostGW, Path: encap.Path{Peer: hostgw.Gateways{Gateway4: netip.MustParseAddr("198.18.0.2"), Gateway6: netip.MustParseAddr("fd00:198::2")}}, Endpoint: netip.MustParseAddrPort("198.18.0.2:8285")}},
		{Peer: mk("udp", "100.96.3.0/24", ""), Choice: Choice{Backend: UDP, Endpoint: netip.MustParseAddrPort("198.19.1.2:8285")}},
		{Peer: mk("thief", "100.96.1.0/24", "fd00:96:0:4::/64"), Choice: Choice{Backend: HostGW, Path: encap.Path{Peer: hostgw.Gateways{Gateway4: netip.MustParseAddr("198.18.0.4"), Gateway6: netip.MustParseAddr("fd00:198::4")}}}},
		{Peer: mk("v4only", "100.96.6.0/24", "fd00:96:0:6::/64"), Choice: Choice{Backend: HostGW, Path: encap.Path{Peer: hostgw.Gateways{Gateway4: netip.MustParseAddr("198.18.0.6")}}, Endpoint: netip.MustParseAddrPort("198.18.0.6:8285")}},
		{Peer: mk("unreachable", "100.96.5.0/24", ""), Choice: Choice{Reason: "no backend"}},
		{Peer: mk("uvx", "100.96.7.0/24", ""), Choice: Choice{Backend: VXLAN, Userspace: true, Path: encap.Path{Peer: vxlan.Remote{VTEP: netip.MustParseAddr("198.19.1.7"), MAC: net.HardwareAddr{2, 0, 0, 0, 0, 7}}}, Endpoint: netip.MustParseAddrPort("198.19.1.7:8472")}},
		{Peer: mk("kvx", "100.96.8.0/24", ""), Choice: Choice{Backend: VXLAN, Path: encap.Path{Peer: vxlan.Remote{VTEP: netip.MustParseAddr("198.19.1.8"), MAC: net.HardwareAddr{2, 0, 0, 0, 0, 8}}}, Endpoint: netip.MustParseAddrPort("198.19.1.8:8285")}},
	}
	pr := encap.Translate(local, as)
	kernelVX, userVX := vxlan.Peers(pr.ByBackend[VXLAN])
	if len(userVX) != 1 || userVX[0].Addr.String() != "198.19.1.7:8472" || userVX[0].MAC.String() != "02:00:00:00:00:07" {
		t.Errorf("userspace VXLAN peers: %+v", userVX)
	}
	if len(kernelVX) != 1 || kernelVX[0].VTEP.String() != "198.19.1.8" {
		t.Errorf("kernel VXLAN peers: %+v", kernelVX)
	}
	var names []string
	for _, p := range pr.Datapath {
		names = append(names, p.Name+"="+p.Addr.String())
	}
	if got := strings.Join(names, " "); got != "gw=198.18.0.2:8285 udp=198.19.1.2:8285 v4only=198.18.0.6:8285 uvx=198.19.1.7:8472 kvx=198.19.1.8:8285" {
		t.Errorf("userspace peers: %s", got)
	}
	var routes []string
	for _, r := range hostgw.Routes(pr.ByBackend[HostGW]) {
		routes = append(routes, r.Dst.String()+">"+r.Via.String())
	}
	// The thief's claim on this node's own subnet is never routed.
	// A family without a next hop on the segment stays on udp.
	if got := strings.Join(routes, " "); got != "100.96.2.0/24>198.18.0.2 fd00:96:0:2::/64>fd00:198::2 fd00:96:0:4::/64>fd00:198::4 100.96.6.0/24>198.18.0.6" {
		t.Errorf("routes: %s", got)
	}
}

// TestSelectWireGuard: with WireGuard configured every peer is reached
// over it or not at all — never over a plaintext backend, never at an
// endpoint without a key — and a malformed key is skipped and named.
func TestSelectWireGuard(t *testing.T) {
	k, _ := wireguard.NewPrivateKey()
	pub := k.Public().String()
	local := Local{Mode: WireGuard, Caps: Caps{WireGuard: wireguard.Caps{Port: 51820, PublicKey: pub}},
		IP4: netip.MustParseAddr("198.18.0.1"), OnLink: []netip.Prefix{netip.MustParsePrefix("198.18.0.0/24")}}
	tests := []struct {
		name     string
		peer     lease.Peer
		backend  string
		endpoint string
		reason   string
	}{
		{"wireguard peer", peer("198.18.0.2", "", map[string]string{"wireguard": `{"port":51821,"publicKey":"` + pub + `"}`}), WireGuard, "198.18.0.2:51821", "forces wireguard"},
		{"plaintext peer on the segment", peer("198.18.0.2", "", map[string]string{"udp": `{"port":8285}`, "host-gw": `{}`}), "", "", "does not advertise wireguard"},
		{"legacy udp peer", peer("198.18.0.2", "", nil), "", "", "does not advertise wireguard"},
		{"malformed key", peer("198.18.0.2", "", map[string]string{"wireguard": `{"port":51820,"publicKey":"nope"}`}), "", "", "capability wireguard: public key"},
		{"zero key", peer("198.18.0.2", "", map[string]string{"wireguard": `{"port":51820,"publicKey":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}`}), "", "", "all zeros"},
		{"no family in common", peer("", "fd00:198::2", map[string]string{"wireguard": `{"port":51820,"publicKey":"` + pub + `"}`}), "", "", "no underlay address"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ch := Select(local, tt.peer)
			var none netip.AddrPort
			if ch.Backend != tt.backend || (tt.endpoint == "" && ch.Endpoint != none) || (tt.endpoint != "" && ch.Endpoint.String() != tt.endpoint) {
				t.Fatalf("got backend %q endpoint %s, want %q %q (reason %q)", ch.Backend, ch.Endpoint, tt.backend, tt.endpoint, ch.Reason)
			}
			if !strings.Contains(ch.Reason, tt.reason) {
				t.Errorf("reason %q does not say %q", ch.Reason, tt.reason)
			}
			pr := encap.Translate(nil, []Assignment{{Peer: tt.peer, Choice: ch}})
			wg := wireguard.Peers(pr.ByBackend[WireGuard])
			if tt.backend == "" && (len(pr.Datapath) > 0 || len(wg) > 0 || len(hostgw.Routes(pr.ByBackend[HostGW])) > 0) {
				t.Errorf("an unreachable peer was programmed: %+v", pr)
			}
			if tt.backend == WireGuard && (len(wg) != 1 || wg[0].Key.String() != pub || len(pr.Datapath) != 1) {
				t.Errorf("programme %+v", pr)
			}
		})
	}
}
