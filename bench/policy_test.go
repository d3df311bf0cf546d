package bench

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"slices"
	"testing"
	"time"

	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/knftables"

	"github.com/tulle-net/tulle/internal/tstest/topo"
	"github.com/tulle-net/tulle/policy"
)

// BenchmarkPolicyPath measures what NetworkPolicy costs on the forward
// path: a TCP stream (iperf3, 1 stream), the round trip of a byte on an
// open connection, and the time to open a new one (whose first packet
// walks the rules), through a router namespace whose policy table isolates
// the server with 50 policies — the one that allows the client judged last
// — against the same table with no policy; interleaved, 3 rounds. The
// enforcement point is the one tulled uses (the forward hook), without a
// tunnel in front, so the figures are the policy's own cost.
func BenchmarkPolicyPath(b *testing.B) {
	if why := topo.Require(); why != "" {
		b.Skip(why)
	}
	for _, tool := range []string{"iperf3", "nft"} {
		if _, err := exec.LookPath(tool); err != nil {
			b.Skip("needs " + tool)
		}
	}
	tp, err := topo.New(topo.Options{Nodes: 1, Routed: 1, Prefix: "tlpolb"})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { tp.Close() })
	client, server := tp.Nodes[0], tp.Nodes[1]
	states := map[string]*policy.State{"none": pathState(client.IP4, server.IP4, 0), "50 policies": pathState(client.IP4, server.IP4, 50)}
	apply := func(name string) {
		rs, _ := policy.Compile(states[name])
		err := topo.DoIn(tp.Router(), func() error {
			nft, err := knftables.New(knftables.InetFamily, policy.TableName)
			if err != nil {
				return err
			}
			return policy.NewTable(nft).Apply(context.Background(), rs)
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	srv, err := startIperf3Server(context.Background(), server, 5201)
	if err != nil {
		b.Fatal(err)
	}
	defer srv.stop()
	type figures struct{ gbps, rttP50, rttP99, connectP50, connectP99 []float64 }
	got := map[string]*figures{"none": {}, "50 policies": {}}
	for b.Loop() {
		for round := range 3 {
			for _, name := range []string{"none", "50 policies"} {
				apply(name)
				f := got[name]
				res, err := runIperf3(context.Background(), client, iperf3Run{Dst: server.IP4, Port: 5201, Duration: 3 * time.Second, Streams: 1})
				if err != nil {
					b.Fatal(err)
				}
				f.gbps = append(f.gbps, res.Gbps())
				p50, p99, err := echoRTT(context.Background(), client, server, server.IP4, 2000, 0)
				if err != nil {
					b.Fatal(err)
				}
				f.rttP50, f.rttP99 = append(f.rttP50, p50), append(f.rttP99, p99)
				c50, c99, err := connectTimes(client, server, 300)
				if err != nil {
					b.Fatal(err)
				}
				f.connectP50, f.connectP99 = append(f.connectP50, c50), append(f.connectP99, c99)
				b.Logf("round %d, %-11s: %.2f Gbit/s, RTT p50 %.1f µs p99 %.1f µs, connect p50 %.1f µs p99 %.1f µs", round+1, name, res.Gbps(), p50, p99, c50, c99)
			}
		}
	}
	med := func(x []float64) float64 { s := slices.Clone(x); slices.Sort(s); return s[len(s)/2] }
	none, many := got["none"], got["50 policies"]
	b.Logf("median of 3: none %.2f Gbit/s, RTT %.1f µs, connect %.1f µs; 50 policies %.2f Gbit/s (%.3f×), RTT %.1f µs (%.3f×), connect %.1f µs (%.3f×)",
		med(none.gbps), med(none.rttP50), med(none.connectP50), med(many.gbps), med(many.gbps)/med(none.gbps),
		med(many.rttP50), med(many.rttP50)/med(none.rttP50), med(many.connectP50), med(many.connectP50)/med(none.connectP50))
	b.ReportMetric(med(many.gbps)/med(none.gbps), "throughput-ratio")
	b.ReportMetric(med(many.rttP50)/med(none.rttP50), "rtt-ratio")
	b.ReportMetric(med(many.connectP50)/med(none.connectP50), "connect-ratio")
}

// pathState is a node (the router) holding one pod, the server, isolated
// by n policies; only the last (by name) allows the client.
func pathState(client, server netip.Addr, n int) *policy.State {
	srv := &policy.Pod{Namespace: "bench", Name: "server", Labels: map[string]string{"app": "server"}, IPs: []netip.Addr{server}}
	cli := &policy.Pod{Namespace: "bench", Name: "client", Labels: map[string]string{"app": "client"}, IPs: []netip.Addr{client}}
	st := &policy.State{Pods: []*policy.Pod{srv, cli}, Namespaces: map[string]map[string]string{"bench": {}},
		Local: map[netip.Addr]*policy.Pod{server: srv}, Subnets: []netip.Prefix{netip.PrefixFrom(server, 24).Masked()}}
	for i := range n {
		from := "other"
		if i == n-1 {
			from = "client"
		}
		// A few peers of their own for each, as real policies have.
		for j := range 4 {
			st.Pods = append(st.Pods, &policy.Pod{Namespace: "bench", Name: fmt.Sprintf("p%d-%d", i, j), Labels: map[string]string{"app": fmt.Sprintf("other%d", i)},
				IPs: []netip.Addr{netip.AddrFrom4([4]byte{100, 64, byte(i), byte(j + 1)})}})
		}
		if from == "other" {
			from = fmt.Sprintf("other%d", i)
		}
		st.Policies = append(st.Policies, &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "bench", Name: fmt.Sprintf("p%03d", i)},
			Spec: networkingv1.NetworkPolicySpec{PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "server"}},
				Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": from}}}}}}}})
	}
	return st
}

// connectTimes is how long opening a TCP connection takes, in µs: its SYN
// is the packet the policy judges.
func connectTimes(from, to *topo.Node, n int) (p50, p99 float64, err error) {
	ln, err := to.Listen(net.JoinHostPort(to.IP4.String(), "0"))
	if err != nil {
		return 0, 0, err
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	var ts []float64
	for range n {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		start := time.Now()
		c, err := from.Dial(ctx, ln.Addr().String())
		cancel()
		if err != nil {
			return 0, 0, err
		}
		ts = append(ts, float64(time.Since(start).Nanoseconds())/1e3)
		c.Close()
	}
	slices.Sort(ts)
	return percentile(ts, 50), percentile(ts, 99), nil
}

// BenchmarkPolicySameNode measures the same-node path: two pods on one
// bridge (the topology's bridge namespace stands for a node's tulle-br0),
// plain (no br_netfilter on the bridge, no table), with br_netfilter and
// the policy table holding no policy, and with the receiver isolated by
// 50 policies; interleaved, 3 rounds. The first step is what seeing
// bridged traffic in the inet forward hook costs at all — the most a
// bridge-family table could save.
func BenchmarkPolicySameNode(b *testing.B) {
	if why := topo.Require(); why != "" {
		b.Skip(why)
	}
	for _, tool := range []string{"iperf3", "nft"} {
		if _, err := exec.LookPath(tool); err != nil {
			b.Skip("needs " + tool)
		}
	}
	tp, err := topo.New(topo.Options{Nodes: 2, Prefix: "tlpols"})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { tp.Close() })
	client, server := tp.Nodes[0], tp.Nodes[1]
	bridge := &topo.Node{Name: "bridge", NS: tp.Bridge}
	setup := func(name string) {
		flag := "1"
		if name == "plain" {
			flag = "0"
		}
		if out, err := bridge.Run("ip", "link", "set", "br0", "type", "bridge", "nf_call_iptables", flag, "nf_call_ip6tables", flag); err != nil {
			b.Fatal(out, err)
		}
		var st *policy.State
		switch name {
		case "plain":
			if err := bridge.Do(func() error { return policy.Cleanup(context.Background()) }); err != nil {
				b.Fatal(err)
			}
			return
		case "br_netfilter":
			st = pathState(client.IP4, server.IP4, 0)
		default:
			st = pathState(client.IP4, server.IP4, 50)
		}
		// Both pods are local here.
		st.Local[client.IP4] = st.Pods[1]
		rs, _ := policy.Compile(st)
		if err := bridge.Do(func() error {
			nft, err := knftables.New(knftables.InetFamily, policy.TableName)
			if err != nil {
				return err
			}
			return policy.NewTable(nft).Apply(context.Background(), rs)
		}); err != nil {
			b.Fatal(err)
		}
	}
	srv, err := startIperf3Server(context.Background(), server, 5201)
	if err != nil {
		b.Fatal(err)
	}
	defer srv.stop()
	names := []string{"plain", "br_netfilter", "50 policies"}
	gbps, rtt, conn := map[string][]float64{}, map[string][]float64{}, map[string][]float64{}
	for b.Loop() {
		for round := range 3 {
			for _, name := range names {
				setup(name)
				res, err := runIperf3(context.Background(), client, iperf3Run{Dst: server.IP4, Port: 5201, Duration: 3 * time.Second, Streams: 1})
				if err != nil {
					b.Fatal(err)
				}
				p50, _, err := echoRTT(context.Background(), client, server, server.IP4, 2000, 0)
				if err != nil {
					b.Fatal(err)
				}
				c50, _, err := connectTimes(client, server, 300)
				if err != nil {
					b.Fatal(err)
				}
				gbps[name], rtt[name], conn[name] = append(gbps[name], res.Gbps()), append(rtt[name], p50), append(conn[name], c50)
				b.Logf("round %d, %-12s: %.2f Gbit/s, RTT p50 %.1f µs, connect p50 %.1f µs", round+1, name, res.Gbps(), p50, c50)
			}
		}
	}
	med := func(x []float64) float64 { s := slices.Clone(x); slices.Sort(s); return s[len(s)/2] }
	for _, name := range names[1:] {
		b.Logf("median of 3, %s vs plain: %.3f× throughput, %.3f× RTT, %.3f× connect", name, med(gbps[name])/med(gbps["plain"]), med(rtt[name])/med(rtt["plain"]), med(conn[name])/med(conn["plain"]))
	}
	b.ReportMetric(med(gbps["br_netfilter"])/med(gbps["plain"]), "brnf-throughput-ratio")
	b.ReportMetric(med(gbps["50 policies"])/med(gbps["plain"]), "policy-throughput-ratio")
}
