package tunnel

import (
	"math/bits"
	"sync/atomic"
	"time"
)

// PeerStats are one peer's traffic through the datapath, kept across peer
// table snapshots (by peer name): one atomic add per frame and direction.
// A super-packet counts as one frame.
type PeerStats struct {
	TxFrames, TxBytes atomic.Uint64
	RxFrames, RxBytes atomic.Uint64
	// Drops are frames from the peer the datapath refused (spoofed
	// source, not for this node, malformed).
	Drops atomic.Uint64
	// LastRx is when a frame from the peer last arrived (Unix ns; 0: never).
	LastRx atomic.Int64
}

func (s *PeerStats) rx(bytes int, now int64) {
	s.RxFrames.Add(1)
	s.RxBytes.Add(uint64(bytes))
	s.LastRx.Store(now)
}

// LastSeen is when the peer was last heard from (zero: never).
func (s *PeerStats) LastSeen() time.Time {
	if ns := s.LastRx.Load(); ns != 0 {
		return time.Unix(0, ns)
	}
	return time.Time{}
}

// Batch sizes: histograms of how many frames one TUN read (tx) or one
// receive call (rx) moved, in power-of-two buckets: two atomic adds per
// batch.
const batchBuckets = 8 // ≤1, ≤2, ≤4, … ≤128

// BatchHistogram is a histogram of batch sizes.
type BatchHistogram struct {
	buckets [batchBuckets]atomic.Uint64
	sum     atomic.Uint64
}

func (h *BatchHistogram) observe(n int) {
	i := 0
	if n > 1 {
		i = min(bits.Len(uint(n-1)), batchBuckets-1)
	}
	h.buckets[i].Add(1)
	h.sum.Add(uint64(n))
}

// Snapshot returns the upper bounds of the buckets, the count in each
// (not cumulative), and the sum of all observations.
func (h *BatchHistogram) Snapshot() (bounds []float64, counts []uint64, sum uint64) {
	for i := range batchBuckets {
		bounds = append(bounds, float64(uint(1)<<i))
		counts = append(counts, h.buckets[i].Load())
	}
	return bounds, counts, h.sum.Load()
}
