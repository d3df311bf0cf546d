package tunnel

import "github.com/tulle-net/tulle/internal/counter"

// Counter names one datapath counter.
type Counter int

// Counters, by direction. Drops are counted by reason; nothing on the
// per-packet path logs.
const (
	TxFrames      Counter = iota // frames read from TUN and handed to the transport
	TxBytes                      // their IP bytes
	RxFrames                     // frames received and written to TUN
	RxBytes                      // their IP bytes
	DropMalformed                // not an IP packet, or offload metadata that does not fit it
	DropNoRoute                  // inner destination owned by no known peer
	DropTooBig                   // DF packet above the MTU (an ICMP too-big was sent if the limiter allowed)
	ICMPTooBigSent
	DropUnknownPeer // came from an underlay address that is no peer's
	DropSpoofed     // inner source outside the sending peer's subnets
	DropNotLocal    // inner destination outside this node's subnets
	DropTUNWrite    // the kernel refused the write
	GROWrites       // packets written through the GRO (coalescing) path
	TUNRecreated    // times the TUN device was deleted under tulled and recreated
	RxSparse        // frames written on the sparse flows' queue (flows.go)
	TxSparse        // frames read from the sparse flows' queue
	AQMMarks        // standing bulk queue: ECN CE set on a packet (aqm.go)
	AQMTrims        // standing bulk queue: a TCP super-packet's last segment left out
	AQMDrops        // standing bulk queue: a packet left out
	numCounters
)

var counterNames = [numCounters]string{
	TxFrames: "tx_frames", TxBytes: "tx_bytes", RxFrames: "rx_frames", RxBytes: "rx_bytes",
	DropMalformed: "drop_malformed", DropNoRoute: "drop_no_route", DropTooBig: "drop_too_big",
	ICMPTooBigSent: "icmp_too_big_sent", DropUnknownPeer: "drop_unknown_peer", DropSpoofed: "drop_spoofed",
	DropNotLocal: "drop_not_local", DropTUNWrite: "drop_tun_write",
	GROWrites: "gro_writes", TUNRecreated: "tun_recreated", RxSparse: "rx_sparse_frames",
	TxSparse: "tx_sparse_frames", AQMMarks: "aqm_ce_marks", AQMTrims: "aqm_trims", AQMDrops: "aqm_drops",
}

// String returns the counter's name as the status API reports it.
func (c Counter) String() string { return counterNames[c] }

// Counters are the datapath's counters; transports keep their own. The
// zero value is ready.
type Counters struct {
	counter.Set[Counter]
	// TxBatch and RxBatch are the sizes of the batches the loops moved.
	TxBatch, RxBatch BatchHistogram
}

// Snapshot returns every counter by name.
func (c *Counters) Snapshot() map[string]uint64 {
	m := make(map[string]uint64, numCounters)
	c.SnapshotInto(counterNames[:], m)
	return m
}
