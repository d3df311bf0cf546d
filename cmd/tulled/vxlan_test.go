package main

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tulle-net/tulle/encap/vxlan"
	"github.com/tulle-net/tulle/internal/netconf"
	"github.com/tulle-net/tulle/internal/tstest/cluster"
	"github.com/tulle-net/tulle/internal/tstest/topo"
	"github.com/tulle-net/tulle/lease"
	"github.com/tulle-net/tulle/lease/local"
)

// vxlanState is n's VXLAN device's FDB, neighbours and routes (empty
// without the device).
func vxlanState(n *cluster.Node) string {
	var b strings.Builder
	for _, cmd := range [][]string{{"bridge", "fdb", "show", "dev", vxlan.DeviceName}, {"ip", "neigh", "show", "dev", vxlan.DeviceName},
		{"ip", "-6", "neigh", "show", "dev", vxlan.DeviceName}, {"ip", "route", "show", "dev", vxlan.DeviceName}, {"ip", "-6", "route", "show", "dev", vxlan.DeviceName}} {
		out, _ := n.Run(cmd[0], cmd[1:]...)
		b.WriteString(out)
	}
	return b.String()
}

// TestMixedVXLAN: VXLAN forced on three nodes, the first with its kernel's
// VXLAN turned off. It speaks VXLAN from its datapath; the others' kernels
// take it for one more VXLAN device. Every pair talks, both families
// inside, over an IPv4 and an IPv6 underlay; and with every node in
// userspace (the backend forced alone).
func TestMixedVXLAN(t *testing.T) {
	for _, tt := range []struct {
		name string
		v6   bool
		user int // the first user nodes speak VXLAN in userspace
	}{
		{"IPv4 underlay", false, 1},
		{"IPv6 underlay", true, 1},
		{"every node in userspace", false, 3},
	} {
		t.Run(tt.name, func(t *testing.T) {
			args := map[int][]string{}
			for i := range tt.user {
				args[i] = []string{"--kernel-vxlan=false"}
			}
			c := startCluster(t, 3, cluster.Options{NetConf: netConfWith("vxlan"), IPv6Underlay: tt.v6, NodeArgs: args})
			a, b, cc := c.Nodes[0], c.Nodes[1], c.Nodes[2]
			for i, n := range c.Nodes {
				got := backends(t, n)
				for _, p := range c.Nodes {
					if p == n {
						continue
					}
					want := "vxlan"
					if i < tt.user {
						want = "vxlan (userspace)"
					}
					if got[p.Name] != want {
						t.Errorf("%s → %s: %q, want %q", n.Name, p.Name, got[p.Name], want)
					}
				}
				if _, err := n.Run("ip", "link", "show", vxlan.DeviceName); (err == nil) == (i < tt.user) {
					t.Errorf("%s: kernel VXLAN device present = %v, want %v", n.Name, err == nil, i >= tt.user)
				}
			}
			pingAll(t, c.Nodes)
			for _, pair := range [][2]*cluster.Node{{a, b}, {b, a}} {
				sent, got := transfer(t, pair[0], pair[1], addr(t, pair[1], false), 30<<20, 0)
				if sent != got {
					t.Fatalf("transfer %s → %s corrupted", pair[0].Name, pair[1].Name)
				}
			}
			sent, got := transfer(t, a, cc, addr(t, cc, true), 10<<20, 0)
			if sent != got {
				t.Fatal("IPv6 transfer corrupted")
			}
			if n := counter(t, a, "vxlan_segmented"); n == 0 {
				t.Error("no super-packet was cut in software: the transfers did not use TSO")
			}
			// Between two datapaths a GSO train arrives as one GRO message,
			// merged back into super-packets; a kernel sender's segments
			// arrive one message each, and the TUN's GRO merges them.
			if n := counter(t, a, "vxlan_coalesced"); (n > 0) != (tt.user > 1) {
				t.Errorf("vxlan_coalesced = %d with %d userspace nodes", n, tt.user)
			}
			for _, k := range []string{"vxlan_drop_malformed", "vxlan_drop_not_for_us", "vxlan_drop_bad_vni", "vxlan_drop_offload", "vxlan_drop_too_big", "vxlan_drop_unknown_source"} {
				if n := counter(t, a, k); n != 0 {
					t.Errorf("%s = %d on the userspace node", k, n)
				}
			}
			if n := counter(t, a, "datagrams_out"); n > 50 {
				t.Errorf("%d udp datagrams left the userspace VXLAN node; want VXLAN to carry everything", n)
			}
		})
	}
}

// TestVXLANTurnedOff: three nodes on three segments use the kernel's VXLAN
// (auto); one restarts with it turned off. Its peers move it to udp and
// keep no FDB, neighbour or route for it; it removes its own device; the
// pair that did not change keeps its entries.
func TestVXLANTurnedOff(t *testing.T) {
	c := startTopology(t, topo.Options{Nodes: 1, Routed: 2}, cluster.Options{NetConf: netConfWith("auto"), DualStackUnderlay: true})
	n1, n2, n3 := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	for _, n := range c.Nodes {
		for p, b := range backends(t, n) {
			if b != "vxlan" {
				t.Fatalf("%s → %s: %q, want the kernel's vxlan before the change", n.Name, p, b)
			}
		}
	}
	mac3 := vxlan.MACFor(n3.Name).String()
	mac2 := vxlan.MACFor(n2.Name).String()
	if s := vxlanState(n1); !strings.Contains(s, mac3) || !strings.Contains(s, mac2) {
		t.Fatalf("n1's VXLAN entries before the change:\n%s", s)
	}
	if err := n3.Stop(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	n3.Extra = []string{"--kernel-vxlan=false"}
	if err := n3.Start(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := n3.WaitPeers(ctx, 2); err != nil {
		t.Fatal(err)
	}
	for _, n := range []*cluster.Node{n1, n2} {
		waitFor(t, func() bool { return backends(t, n)[n3.Name] == "udp" }, n.Name+" to move n3 to udp")
		waitFor(t, func() bool { return !strings.Contains(vxlanState(n), mac3) }, n.Name+" to drop n3's VXLAN entries")
		sub, err := n3.Subnets(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if s := vxlanState(n); strings.Contains(s, sub[0].String()) || strings.Contains(s, sub[1].String()) {
			t.Errorf("%s keeps a VXLAN route to n3's subnets:\n%s", n.Name, s)
		}
		if r := peerReason(t, n, n3.Name); !strings.Contains(r, "the peer's VXLAN is in userspace") {
			t.Errorf("%s → n3 reason %q", n.Name, r)
		}
	}
	if !strings.Contains(vxlanState(n1), mac2) {
		t.Error("n1 lost its entries for n2, which did not change")
	}
	if out, err := n3.Run("ip", "link", "show", vxlan.DeviceName); err == nil {
		t.Errorf("n3 kept its kernel VXLAN device after turning it off: %s", out)
	}
	if !strings.Contains(n3.Log(), "removed the kernel VXLAN device of an earlier run") {
		t.Error("n3 did not say it removed its former device")
	}
	pingAll(t, c.Nodes)
	sent, got := transfer(t, n1, n3, addr(t, n3, false), 10<<20, 0)
	if sent != got {
		t.Fatal("transfer to the changed node corrupted")
	}
}

func peerReason(t *testing.T, n *cluster.Node, peer string) string {
	t.Helper()
	s, err := n.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range s.Peers {
		if p.Name == peer {
			return p.Reason
		}
	}
	return ""
}

// TestFlannelInterop: a node whose VXLAN device is configured by hand the
// way flannel's vxlan backend does it (no tulled there) and a tulled
// speaking VXLAN in userspace exchange traffic. The hand-made node is
// known to tulled by a lease naming its VTEP, as flannel publishes it.
func TestFlannelInterop(t *testing.T) {
	requireNetns(t)
	dir := t.TempDir()
	c, err := cluster.Build(topo.Options{Nodes: 2}, cluster.Options{Tulled: tulled(t), Dir: dir, NetConf: netConfWith("auto"),
		NodeArgs: map[int][]string{0: {"--kernel-vxlan=false"}}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.CloseFor(t) })
	tn, fl := c.Nodes[0], c.Nodes[1]

	// The flannel node's lease, as its subnet manager would have it.
	nc, err := netconf.Parse([]byte(netConfWith("auto")))
	if err != nil {
		t.Fatal(err)
	}
	st, err := local.New(local.Options{Dir: filepath.Join(dir, "leases"), Net: nc, TTL: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	flMAC := vxlan.MACFor("flannel-" + fl.Name)
	vx, _ := json.Marshal(vxlan.Caps{VNI: 1, Port: 8472, MAC: flMAC.String()})
	fll, err := st.Claim(context.Background(), fl.Name, lease.Attrs{PublicIP: fl.IP4, Backends: map[string]json.RawMessage{vxlan.Name: vx}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := tn.Start(); err != nil {
		t.Fatal(err)
	}
	if err := tn.WaitPeers(ctx, 1); err != nil {
		t.Fatal(err)
	}
	if got := backends(t, tn)[fl.Name]; got != "vxlan (userspace)" {
		t.Fatalf("tulled → flannel node: %q (%s), want vxlan (userspace)", got, peerReason(t, tn, fl.Name))
	}
	tsub, err := tn.Subnets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	tnMAC := vxlan.MACFor(tn.Name)
	gw := fll.Subnet.Addr() // flannel puts subnet.0/32 on flannel.1
	// flannel's vxlan backend, by hand: device, address, FDB entry,
	// permanent neighbour and onlink route per remote node.
	script := strings.Join([]string{
		fmt.Sprintf("ip link add flannel.1 type vxlan id 1 local %s dev %s dstport 8472 nolearning", fl.IP4, fl.Link),
		fmt.Sprintf("ip link set flannel.1 address %s mtu 1450 up", flMAC),
		fmt.Sprintf("ip addr add %s/32 dev flannel.1", gw),
		fmt.Sprintf("bridge fdb append %s dev flannel.1 dst %s", tnMAC, tn.IP4),
		fmt.Sprintf("ip neigh replace %s lladdr %s dev flannel.1 nud permanent", tsub[0].Addr(), tnMAC),
		fmt.Sprintf("ip route replace %s via %s dev flannel.1 onlink", tsub[0], tsub[0].Addr()),
	}, " && ")
	if out, err := fl.Run("sh", "-c", script); err != nil {
		t.Fatalf("flannel-style setup: %v\n%s", err, out)
	}
	t.Cleanup(func() { fl.Run("ip", "link", "del", "flannel.1") })

	ping(t, tn, gw)
	ping(t, fl, addr(t, tn, false))
	for _, pair := range [][2]*cluster.Node{{tn, fl}, {fl, tn}} {
		dst := gw
		if pair[1] == tn {
			dst = addr(t, tn, false)
		}
		r, err := cluster.Transfer(ctx, pair[0], pair[1], dst, 20<<20, 0)
		if err != nil || !r.Intact() {
			t.Fatalf("transfer %s → %s: %v (intact %v)", pair[0].Name, pair[1].Name, err, r.Intact())
		}
	}
	if counter(t, tn, "vxlan_datagrams_in") == 0 || counter(t, tn, "vxlan_datagrams_out") == 0 {
		t.Error("the traffic did not cross userspace VXLAN")
	}
	out, _ := fl.Run("ip", "-s", "link", "show", "flannel.1")
	t.Logf("flannel.1 after the transfers:\n%s", out)
}
