package tunnel

import (
	"sync/atomic"
	"time"
)

// Sparse flows get a TUN queue of their own. The TUN's rings have no
// backpressure (tun_net_xmit orphans each skb, so TCP small queues stop
// counting it, and never stops the queue): a bulk TCP stream fills its
// ring with up to a window of super-packets, and any packet behind them
// waits for all of them — a ping beside one bulk stream waited 1.4 ms
// where the path's idle RTT is 0.2 ms. A multi-queue device keeps queue 0
// for sparse flows (pings, request/response, DNS, interactive sessions):
// the rx loop writes a sparse flow's packets there, so the kernel, which
// steers a flow's outgoing packets to the queue its incoming ones were
// last written on, puts them in a ring that holds no bulk traffic, read
// by a loop of its own. Bulk flows are spread over the other queues.
//
// A flow is bulk once it moves more than BulkBytes or BulkPackets within
// one FlowWindow, in either direction (so a small-packet flood is bulk
// too and cannot starve the sparse queue's flows). It becomes sparse again
// only after SparseAfter without a packet: its packets still waiting in a
// bulk ring are long sent by then, so moving it reorders nothing. A flow
// newly bulk moves off the sparse queue when that queue's ring is empty
// (its loop waits in read), so none of its packets are still queued there
// — or, a flood that keeps the ring busy, after MoveAfter all the same.
//
// Flows are counted in a fixed table of buckets by a hash that is the
// same in both directions: bounded memory whatever arrives, no lock, and
// two flows sharing a bucket are one flow to it (the heavier one's class
// wins, so a collision can make a sparse flow bulk, never the reverse).
const (
	FlowWindow  = 10 * time.Millisecond
	BulkBytes   = 64 << 10 // per window: ≈ 52 Mbit/s
	BulkPackets = 200      // per window: 20,000 packets/s
	SparseAfter = 50 * time.Millisecond
	MoveAfter   = 20 * time.Millisecond

	flowBuckets = 1 << 12
)

// flowBucket is one bucket's state; fields are updated without a lock, so
// counts are approximate under races (the class is a heuristic).
type flowBucket struct {
	window atomic.Int64 // FlowWindow number the counts are for
	bytes  atomic.Int64
	pkts   atomic.Int64
	last   atomic.Int64 // ns: the last packet, either direction
	bulk   atomic.Int64 // ns: when it became bulk; 0 while sparse
	onBulk atomic.Bool  // the rx loop last wrote it on a bulk queue
	_      [16]byte
}

// flowTable classifies flows as sparse or bulk.
type flowTable struct {
	b [flowBuckets]flowBucket
	// sparseIdle is set while the sparse queue's loop waits in read: its
	// ring is empty.
	sparseIdle atomic.Bool
}

// observe counts a packet of n bytes of the flow with hash h, at now (ns).
func (t *flowTable) observe(h uint32, n int, now int64) {
	b := &t.b[h%flowBuckets]
	if b.last.Load() != now { // a loop's batch shares one now: one store
		b.last.Store(now)
	}
	if b.bulk.Load() != 0 {
		return // until it is quiet, only its last packet matters
	}
	w := now / int64(FlowWindow)
	if old := b.window.Load(); old != w && b.window.CompareAndSwap(old, w) {
		b.bytes.Store(0)
		b.pkts.Store(0)
	}
	bytes, pkts := b.bytes.Add(int64(n)), b.pkts.Add(1)
	if bytes > BulkBytes || pkts > BulkPackets {
		b.bulk.CompareAndSwap(0, max(now, 1)) // 0 means sparse
	}
}

// sparseQueue reports whether the rx loop writes the flow with hash h on
// the sparse queue, at now (ns), before it observes the packet.
func (t *flowTable) sparseQueue(h uint32, now int64) bool {
	b := &t.b[h%flowBuckets]
	since := b.bulk.Load()
	switch {
	case since != 0 && now-b.last.Load() >= int64(SparseAfter):
		b.bulk.CompareAndSwap(since, 0) // quiet long enough: sparse again
		b.onBulk.Store(false)
		return true
	case since == 0:
		return true
	case b.onBulk.Load():
		return false
	case t.sparseIdle.Load() || now-since >= int64(MoveAfter):
		b.onBulk.Store(true)
		return false
	}
	return true // bulk, but its packets may still be in the sparse ring
}
