package tunnel

import (
	"testing"
	"time"
)

// TestFlowClasses walks one flow through the classes with a fake clock:
// each step sends packets (observe, as the tx and rx loops do) and asks
// where the rx loop writes the flow next.
func TestFlowClasses(t *testing.T) {
	const ms = int64(time.Millisecond)
	type step struct {
		at         int64 // ms
		pkts, size int   // observed at "at", before the question
		sparseIdle bool
		want       bool // sparse queue
		why        string
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{"a ping stays sparse", []step{
			{0, 1, 84, false, true, "new flow"},
			{1000, 1, 84, false, true, "a packet a second"},
			{1001, 1, 84, false, true, "the reply"},
		}},
		{"a bulk stream is bulk once its ring allows", []step{
			{0, 1, 60, false, true, "a SYN"},
			{1, 2, 65000, false, true, "two super-packets: bulk, but the sparse ring is busy"},
			{2, 1, 1500, true, false, "the sparse ring is empty: moved"},
			{3, 0, 0, false, false, "stays bulk even when the sparse ring is busy"},
		}},
		{"a small-packet flood becomes bulk", []step{
			{0, 150, 64, false, true, "150 packets: still sparse"},
			{5, 100, 64, false, true, "250 in one window: bulk, ring busy"},
			{5 + 21, 1, 64, false, false, "MoveAfter passed: moved although the ring never empties"},
		}},
		{"windows reset: a steady trickle stays sparse", []step{
			{0, 40, 1400, false, true, "56 KB in one window"},
			{11, 40, 1400, false, true, "56 KB in the next"},
			{22, 40, 1400, false, true, "and the next"},
		}},
		{"bulk becomes sparse only after a quiet SparseAfter", []step{
			{0, 3, 65000, true, false, "bulk at once"},
			{40, 1, 100, true, false, "a small packet 40 ms later: still bulk"},
			{89, 0, 0, true, false, "49 ms quiet"},
			{91, 0, 0, true, true, "51 ms quiet: sparse again"},
			{92, 1, 100, false, true, "and stays so"},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var ft flowTable
			const h = 12345
			for _, s := range tt.steps {
				now := s.at * ms
				for range s.pkts {
					ft.observe(h, s.size, now)
				}
				ft.sparseIdle.Store(s.sparseIdle)
				if got := ft.sparseQueue(h, now+1); got != s.want {
					t.Fatalf("at %d ms (%s): sparse queue = %v, want %v", s.at, s.why, got, s.want)
				}
			}
		})
	}
}

// TestFlowHashSymmetric: both directions of a flow share a hash, so the
// tx loops (one direction) and the rx loop (the other) count one flow.
func TestFlowHashSymmetric(t *testing.T) {
	fwd := make([]byte, 40)
	fwd[0], fwd[9] = 0x45, 6
	copy(fwd[12:], []byte{100, 64, 1, 7, 100, 64, 2, 9, 0x9c, 0x40, 0x14, 0x51})
	rev := make([]byte, 40)
	rev[0], rev[9] = 0x45, 6
	copy(rev[12:], []byte{100, 64, 2, 9, 100, 64, 1, 7, 0x14, 0x51, 0x9c, 0x40})
	if flowHash(fwd) != flowHash(rev) {
		t.Errorf("the two directions of one flow hash apart: %x, %x", flowHash(fwd), flowHash(rev))
	}
	rev[20] ^= 1 // another source port: another flow
	if flowHash(fwd) == flowHash(rev) {
		t.Error("two flows share a hash")
	}
}

// TestFlowTableAllocs: the per-packet work allocates nothing.
func TestFlowTableAllocs(t *testing.T) {
	var ft flowTable
	pkt := make([]byte, 40)
	pkt[0], pkt[9] = 0x45, 17
	n := testing.AllocsPerRun(1000, func() {
		h := flowHash(pkt)
		ft.sparseQueue(h, 1)
		ft.observe(h, len(pkt), 1)
	})
	if n != 0 {
		t.Errorf("%.1f allocations per packet", n)
	}
}
