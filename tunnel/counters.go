package tunnel

import "sync/atomic"

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
	DropSend        // the transport failed to send
	GROWrites       // packets written through the GRO (coalescing) path
	TUNRecreated    // times the TUN device was deleted under tulled and recreated

	// Transport counters (encap).
	DatagramsOut      // datagrams sent
	DatagramsIn       // datagrams received
	DropBadVersion    // tulle header version this build does not speak
	DropBadHeader     // truncated or inconsistent tulle header or descriptor
	DropIncomplete    // frames whose train lost, reordered or interleaved a datagram
	DropUnknownSource // datagrams from an address and port that are no peer's (before any state is kept)
	DropTrainEvicted  // trains abandoned, or not started, because the reassembly buffers were all in use
	GSOFallbacks      // times UDP GSO was turned off after EIO
	numCounters
)

var counterNames = [numCounters]string{
	TxFrames: "tx_frames", TxBytes: "tx_bytes", RxFrames: "rx_frames", RxBytes: "rx_bytes",
	DropMalformed: "drop_malformed", DropNoRoute: "drop_no_route", DropTooBig: "drop_too_big",
	ICMPTooBigSent: "icmp_too_big_sent", DropUnknownPeer: "drop_unknown_peer", DropSpoofed: "drop_spoofed",
	DropNotLocal: "drop_not_local", DropTUNWrite: "drop_tun_write", DropSend: "drop_send",
	GROWrites: "gro_writes", TUNRecreated: "tun_recreated",
	DatagramsOut: "datagrams_out", DatagramsIn: "datagrams_in", DropBadVersion: "drop_bad_version",
	DropBadHeader: "drop_bad_header", DropIncomplete: "drop_incomplete", DropUnknownSource: "drop_unknown_source",
	DropTrainEvicted: "drop_train_evicted",
	GSOFallbacks:     "gso_fallbacks",
}

// String returns the counter's name as the status API reports it.
func (c Counter) String() string { return counterNames[c] }

// Counters are the datapath's counters. The zero value is ready.
type Counters struct {
	c [numCounters]atomic.Uint64
}

// Add adds n to counter k.
func (c *Counters) Add(k Counter, n uint64) { c.c[k].Add(n) }

// Get returns counter k.
func (c *Counters) Get(k Counter) uint64 { return c.c[k].Load() }

// Snapshot returns every counter by name.
func (c *Counters) Snapshot() map[string]uint64 {
	m := make(map[string]uint64, numCounters)
	for i := range numCounters {
		m[counterNames[i]] = c.c[i].Load()
	}
	return m
}
