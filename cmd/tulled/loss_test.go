package main

import (
	"testing"

	"github.com/tulle-net/tulle/internal/tstest/cluster"
)

// TestLossyWire runs the udp backend over a wire-like underlay (single
// packets cross, as from a NIC) that drops 1% of the packets arriving on
// every link: TCP super-packets are cut along their segments, so a lost
// datagram costs only its own segment and a checksummed transfer completes
// in both families. Before cutting, a lost datagram took its whole 64 KB
// frame and this transfer ran at ~30 Mbit/s.
func TestLossyWire(t *testing.T) {
	c := startCluster(t, 2, cluster.Options{})
	if err := c.Topo.WireLike(); err != nil {
		t.Fatal(err)
	}
	if err := c.Topo.Loss(1); err != nil {
		t.Fatal(err)
	}
	a, b := c.Nodes[0], c.Nodes[1]
	for _, v6 := range []bool{false, true} {
		sent, got := transfer(t, a, b, addr(t, b, v6), 100<<20, 0)
		if sent != got {
			t.Fatalf("checksum mismatch at 1%% loss (IPv6 inner: %v)", v6)
		}
	}
	if n := counter(t, a, "frames_cut"); n == 0 {
		t.Error("frames_cut = 0: super-packets were not cut along their segments")
	}
	if n := counter(t, b, "frames_coalesced"); n == 0 {
		t.Error("frames_coalesced = 0: the receiver wrote every segment on its own")
	}
	if n := counter(t, b, "drop_incomplete"); n != 0 {
		t.Errorf("drop_incomplete = %d: trains were used and lost", n)
	}
}
