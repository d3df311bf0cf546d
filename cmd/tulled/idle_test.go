package main

import (
	"testing"
	"time"

	"github.com/tulle-net/tulle/internal/tstest/cluster"
)

// TestIdleCPU: once traffic stops, tulled sleeps. Its loops block in the
// kernel (no spinning, no busy polling), so a node that has just carried a
// bulk transfer uses next to no CPU: measured from /proc over 3 s, with a
// generous bound (a busy loop would use 100%).
func TestIdleCPU(t *testing.T) {
	for _, tc := range []struct{ name, netConf string }{
		{"udp", cluster.DefaultNetConf},
		// WireGuard's timers tick every 100 ms.
		{"wireguard", wgNetConf},
	} {
		t.Run(tc.name, func(t *testing.T) { idleCPU(t, tc.netConf) })
	}
}

func idleCPU(t *testing.T, netConf string) {
	c := startCluster(t, 2, cluster.Options{NetConf: netConf, Args: []string{"--tun-queues", "2"}})
	a, b := c.Nodes[0], c.Nodes[1]
	if sent, got := transfer(t, a, b, addr(t, b, false), 100<<20, 0); sent != got {
		t.Fatal("transfer corrupted")
	}
	time.Sleep(500 * time.Millisecond) // trains and flows time out
	const window = 3 * time.Second
	before := map[*cluster.Node]float64{a: cluster.ProcCPUSeconds(a.PID()), b: cluster.ProcCPUSeconds(b.PID())}
	time.Sleep(window)
	for _, n := range []*cluster.Node{a, b} {
		used := cluster.ProcCPUSeconds(n.PID()) - before[n]
		pct := 100 * used / window.Seconds()
		t.Logf("%s: %.2f%% of one CPU idle after the transfer", n.Name, pct)
		if pct > 5 {
			t.Errorf("%s: tulled used %.1f%% of a CPU while idle, want ~0 (≤ 5%%)", n.Name, pct)
		}
	}
}
