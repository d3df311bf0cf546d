package main

import (
	"context"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tulle-net/tulle/encap/vxlan"
	"github.com/tulle-net/tulle/internal/tstest/cluster"
	"github.com/tulle-net/tulle/internal/tstest/topo"
)

// netConfWith is the default test network with another Backend.Type.
func netConfWith(backend string) string {
	return strings.Replace(cluster.DefaultNetConf, `"Type":"udp"`, fmt.Sprintf(`"Type":%q`, backend), 1)
}

// backends returns peer → backend from n's status: "vxlan (userspace)"
// when tulled's datapath speaks it.
func backends(t *testing.T, n *cluster.Node) map[string]string {
	t.Helper()
	s, err := n.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]string{}
	for _, p := range s.Peers {
		m[p.Name] = p.Backend
		if p.Userspace {
			m[p.Name] += " (userspace)"
		}
		if p.Reason == "" {
			t.Errorf("%s: peer %s has no reason for its backend", n.Name, p.Name)
		}
	}
	return m
}

// tulleRoutes lists n's routes of route protocol 116, both families.
func tulleRoutes(t *testing.T, n *cluster.Node) string {
	t.Helper()
	v4, err := n.Run("ip", "route", "show", "proto", "116")
	if err != nil {
		t.Fatal(err)
	}
	v6, err := n.Run("ip", "-6", "route", "show", "proto", "116")
	if err != nil {
		t.Fatal(err)
	}
	return v4 + v6
}

func pingAll(t *testing.T, ns []*cluster.Node) {
	t.Helper()
	for _, from := range ns {
		for _, to := range ns {
			if from != to {
				ping(t, from, addr(t, to, false))
				ping(t, from, addr(t, to, true))
			}
		}
	}
}

// kernelTransfer checks that a 50 MB transfer over a kernel path arrives
// intact with (almost) nothing through tulled.
func kernelTransfer(t *testing.T, from, to *cluster.Node, path string) {
	t.Helper()
	before := counter(t, from, "datagrams_out")
	sent, got := transfer(t, from, to, addr(t, to, false), 50<<20, 0)
	if sent != got {
		t.Fatalf("transfer over %s corrupted", path)
	}
	if d := counter(t, from, "datagrams_out") - before; d > 100 {
		t.Errorf("%d datagrams left tulled during a %s transfer; want the kernel to carry it", d, path)
	}
}

// leave stops n's tulled and runs its cleanup: the node leaves the cluster.
func leave(t *testing.T, n *cluster.Node) {
	t.Helper()
	if err := n.Stop(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := n.Cleanup(); err != nil {
		t.Fatal(err)
	}
}

// TestHostGW forces host-gw on three nodes of one segment: plain routes via
// each peer's underlay address carry everything, tulled's datapath moves
// nothing, and a peer that leaves takes its routes with it.
func TestHostGW(t *testing.T) {
	c := startCluster(t, 3, cluster.Options{NetConf: netConfWith("host-gw"), DualStackUnderlay: true})
	ns := c.Nodes
	for _, n := range ns {
		for peer, b := range backends(t, n) {
			if b != "host-gw" {
				t.Errorf("%s → %s: backend %q, want host-gw", n.Name, peer, b)
			}
		}
	}
	waitFor(t, func() bool {
		r := tulleRoutes(t, ns[0])
		sub2, _ := ns[1].Subnets(context.Background())
		return strings.Contains(r, sub2[0].String()+" via "+ns[1].IP4.String()+" dev eth0") &&
			strings.Contains(r, sub2[1].String()+" via "+ns[1].IP6.String()+" dev eth0")
	}, "host-gw routes to n2 (IPv4 and IPv6) on n1")
	pingAll(t, ns)
	kernelTransfer(t, ns[0], ns[1], "host-gw")
	// A restart of n1 never takes its host-gw routes away: watch them
	// throughout, from before the stop until the new tulled has its peers.
	sub2, _ := ns[1].Subnets(context.Background())
	route := sub2[0].String() + " via " + ns[1].IP4.String()
	stop, missing := make(chan struct{}), make(chan string, 1)
	go func() {
		for {
			select {
			case <-stop:
				close(missing)
				return
			default:
			}
			if out, _ := ns[0].Run("ip", "route", "show", "proto", "116"); !strings.Contains(out, route) {
				select {
				case missing <- out:
				default:
				}
			}
		}
	}()
	if err := ns[0].Stop(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := ns[0].Start(); err != nil {
		t.Fatal(err)
	}
	if err := ns[0].WaitPeers(context.Background(), 2); err != nil {
		t.Fatal(err)
	}
	waitReady(t, ns[0])
	close(stop)
	if out, ok := <-missing; ok {
		t.Errorf("the host-gw route %q went missing during a restart:\n%s", route, out)
	}

	// n3 leaves: its routes go from the others.
	sub3, _ := ns[2].Subnets(context.Background())
	leave(t, ns[2])
	for _, n := range ns[:2] {
		waitFor(t, func() bool {
			r := tulleRoutes(t, n)
			return !strings.Contains(r, sub3[0].String()) && !strings.Contains(r, sub3[1].String())
		}, n.Name+" to drop the routes of the departed n3")
	}
	if r := tulleRoutes(t, ns[2]); strings.TrimSpace(r) != "" {
		t.Errorf("tulled cleanup left routes behind:\n%s", r)
	}
}

// TestAutoAcrossARouter: two nodes share a segment and a third sits behind
// a router. auto picks host-gw for the pair on the segment and the
// kernel's VXLAN (every node here has it) for the others, and every pair
// talks.
func TestAutoAcrossARouter(t *testing.T) {
	c := startTopology(t, topo.Options{Nodes: 2, Routed: 1}, cluster.Options{NetConf: netConfWith("auto"), DualStackUnderlay: true})
	n1, n2, n3 := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	want := map[string]map[string]string{
		n1.Name: {n2.Name: "host-gw", n3.Name: "vxlan"},
		n2.Name: {n1.Name: "host-gw", n3.Name: "vxlan"},
		n3.Name: {n1.Name: "vxlan", n2.Name: "vxlan"},
	}
	for _, n := range c.Nodes {
		got := backends(t, n)
		for peer, b := range want[n.Name] {
			if got[peer] != b {
				t.Errorf("%s → %s: backend %q, want %s", n.Name, peer, got[peer], b)
			}
		}
	}
	pingAll(t, c.Nodes)
	sent, got := transfer(t, n1, n3, addr(t, n3, false), 20<<20, 0)
	if sent != got {
		t.Fatal("transfer across the router corrupted")
	}
}

// TestTwoTulledsOneHost: two tulleds per node with different cluster
// networks (a udp one and a host-gw one, as the benchmark runs them) never
// touch each other's routes.
func TestTwoTulledsOneHost(t *testing.T) {
	udp := startCluster(t, 2, cluster.Options{DualStackUnderlay: true})
	other := `{"Network":"100.112.0.0/12","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"fd00:97::/56","IPv6SubnetLen":64,"Backend":{"Type":"host-gw","Port":8286}}`
	hg, err := cluster.New(udp.Topo, cluster.Options{Tulled: tulled(t), Dir: t.TempDir(), NetConf: other, Args: []string{"--tun", "tullehg0"}, DualStackUnderlay: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := hg.Stop(); err != nil {
			t.Error(err)
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := hg.Start(ctx); err != nil {
		t.Fatal(err)
	}
	sub, err := hg.Nodes[1].Subnets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	route := sub[0].String() + " via " + hg.Nodes[1].IP4.String()
	// Both routers reconcile on every route event: had either touched the
	// other's routes, they would flap from here on.
	for i := range 50 {
		if out, _ := hg.Nodes[0].Run("ip", "route", "show", "proto", "116"); !strings.Contains(out, route) {
			t.Fatalf("sample %d: the host-gw tulled's route %q is missing:\n%s", i, route, out)
		}
		time.Sleep(20 * time.Millisecond)
	}
	for _, n := range udp.Nodes {
		if strings.Contains(n.Log(), "removed stale route") {
			t.Errorf("the udp tulled on %s removed another tulled's route:\n%s", n.Name, n.Log())
		}
	}
	ping(t, udp.Nodes[0], addr(t, udp.Nodes[1], false))
	ping(t, hg.Nodes[0], addr(t, hg.Nodes[1], false))
}

// TestKernelVXLAN forces the kernel's VXLAN on three nodes: flannel's L3
// model (FDB entry, permanent neighbour, onlink route per peer) carries
// everything, tulled moves nothing, a departed peer leaves no entry behind
// and cleanup removes the device.
func TestKernelVXLAN(t *testing.T) {
	c := startCluster(t, 3, cluster.Options{NetConf: netConfWith("vxlan")})
	ns := c.Nodes
	t.Cleanup(func() {
		if t.Failed() {
			out, _ := ns[0].Run("sh", "-c", "ip -d link show tulle-vx0; ip -6 addr show dev tulle-vx0; ip -6 route; sysctl net.ipv6.conf.tulle-vx0.disable_ipv6")
			t.Log(out)
		}
	})
	for _, n := range ns {
		for peer, b := range backends(t, n) {
			if b != "vxlan" {
				t.Errorf("%s → %s: backend %q, want vxlan", n.Name, peer, b)
			}
		}
	}
	state := func(n *cluster.Node) string {
		var b strings.Builder
		for _, cmd := range [][]string{{"bridge", "fdb", "show", "dev", "tulle-vx0"}, {"ip", "neigh", "show", "dev", "tulle-vx0"},
			{"ip", "-6", "neigh", "show", "dev", "tulle-vx0"}, {"ip", "route", "show", "dev", "tulle-vx0"}, {"ip", "-6", "route", "show", "dev", "tulle-vx0"}} {
			out, _ := n.Run(cmd[0], cmd[1:]...)
			b.WriteString(out)
		}
		return b.String()
	}
	entriesFor := func(n, peer *cluster.Node) []string {
		subs, err := peer.Subnets(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		mac := vxlan.MACFor(peer.Name).String()
		return []string{
			mac + " dst " + peer.IP4.String(), // FDB
			subs[0].Addr().String() + " lladdr " + mac + " PERMANENT",
			vxlan.Gateway(subs[1], vxlan.MACFor(peer.Name)).String() + " lladdr " + mac + " PERMANENT",
			subs[0].String() + " via " + subs[0].Addr().String() + " proto 116 src",
			subs[1].String() + " via " + vxlan.Gateway(subs[1], vxlan.MACFor(peer.Name)).String() + " proto 116 src",
		}
	}
	for _, n := range ns {
		for _, p := range ns {
			if n == p {
				continue
			}
			want := entriesFor(n, p)
			waitFor(t, func() bool {
				s := state(n)
				for _, w := range want {
					if !strings.Contains(s, w) {
						return false
					}
				}
				return true
			}, fmt.Sprintf("%s's VXLAN entries for %s: %q", n.Name, p.Name, want))
		}
	}
	pingAll(t, ns)
	kernelTransfer(t, ns[0], ns[1], "kernel VXLAN")
	gone := entriesFor(ns[0], ns[2])
	leave(t, ns[2])
	for _, n := range ns[:2] {
		waitFor(t, func() bool {
			s := state(n)
			for _, w := range gone {
				if strings.Contains(s, w) || strings.Contains(s, vxlan.MACFor(ns[2].Name).String()) {
					return false
				}
			}
			return true
		}, n.Name+" to drop every VXLAN entry of the departed n3")
	}
	if out, err := ns[2].Run("ip", "link", "show", "tulle-vx0"); err == nil {
		t.Errorf("tulled cleanup left the VXLAN device: %s", out)
	}
	if r := tulleRoutes(t, ns[2]); strings.TrimSpace(r) != "" {
		t.Errorf("tulled cleanup left routes behind:\n%s", r)
	}
	ping(t, ns[0], addr(t, ns[1], true))
}
