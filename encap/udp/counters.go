package udp

import "github.com/tulle-net/tulle/internal/counter"

// Counter names one counter of the udp backend.
type Counter int

// The udp backend's counters. Drops are counted by reason; nothing on the
// per-datagram path logs.
const (
	DatagramsOut      Counter = iota // datagrams sent
	DatagramsIn                      // datagrams received
	DropSend                         // datagrams or frames the socket refused (or too large for a train)
	DropBadVersion                   // tulle header version this build does not speak
	DropBadHeader                    // truncated or inconsistent tulle header or descriptor
	DropIncomplete                   // frames whose train lost or reordered a datagram, or stopped arriving
	DropUnknownSource                // datagrams from an address and port that are no peer's (before any state is kept)
	DropTrainEvicted                 // trains abandoned, or not started, because the reassembly buffers were all in use
	GSOFallbacks                     // times UDP GSO was turned off after EIO
	Cut                              // super-packets sent cut along their segments (one frame per datagram)
	Coalesced                        // received frames merged into TSO super-packets before the TUN write
	SparseIn                         // datagrams received on the sparse flows' socket (of DatagramsIn)
	numCounters
)

var counterNames = [numCounters]string{
	DatagramsOut: "datagrams_out", DatagramsIn: "datagrams_in", DropSend: "drop_send",
	DropBadVersion: "drop_bad_version", DropBadHeader: "drop_bad_header", DropIncomplete: "drop_incomplete",
	DropUnknownSource: "drop_unknown_source", DropTrainEvicted: "drop_train_evicted", GSOFallbacks: "gso_fallbacks",
	Cut: "frames_cut", Coalesced: "frames_coalesced", SparseIn: "sparse_datagrams_in",
}

// String returns the counter's name as the status API reports it.
func (c Counter) String() string { return counterNames[c] }

// Counters are the udp backend's counters. The zero value is ready.
type Counters struct{ counter.Set[Counter] }

// SnapshotInto adds every counter, by name, to m.
func (c *Counters) SnapshotInto(m map[string]uint64) { c.Set.SnapshotInto(counterNames[:], m) }
