package vxlan

import "github.com/tulle-net/tulle/internal/counter"

// Counter names one counter of userspace VXLAN.
type Counter int

// Userspace VXLAN's counters. Drops are counted by reason; nothing on the
// per-datagram path logs.
const (
	DatagramsOut      Counter = iota // datagrams sent
	DatagramsIn                      // datagrams received
	Segmented                        // super-packets cut into segments in software
	DropSend                         // datagrams the socket refused
	DropNoPeer                       // frames for an endpoint that is no VXLAN peer's (it left)
	DropOffload                      // frames whose offload metadata does not fit the packet
	DropTooBig                       // frames whose packets do not fit one datagram on the underlay
	DropMalformed                    // datagrams too short, without the VXLAN I flag, or not Ethernet + IP inside
	DropBadVNI                       // datagrams of another VXLAN network
	DropNotForUs                     // inner Ethernet destination is not this node's VTEP MAC
	DropUnknownSource                // from an address that is no VXLAN peer's (before any state is kept)
	GSOFallbacks                     // times UDP GSO was turned off after EIO
	ChecksumsFinished                // received packets whose sender left the checksum unfinished
	Coalesced                        // received TCP segments merged into super-packets
	numCounters
)

var counterNames = [numCounters]string{
	DatagramsOut: "vxlan_datagrams_out", DatagramsIn: "vxlan_datagrams_in", Segmented: "vxlan_segmented",
	DropSend: "vxlan_drop_send", DropNoPeer: "vxlan_drop_no_peer", DropOffload: "vxlan_drop_offload",
	DropTooBig: "vxlan_drop_too_big", DropMalformed: "vxlan_drop_malformed", DropBadVNI: "vxlan_drop_bad_vni",
	DropNotForUs: "vxlan_drop_not_for_us", DropUnknownSource: "vxlan_drop_unknown_source", GSOFallbacks: "vxlan_gso_fallbacks",
	ChecksumsFinished: "vxlan_checksums_finished", Coalesced: "vxlan_coalesced",
}

// String returns the counter's name as the status API reports it.
func (c Counter) String() string { return counterNames[c] }

// Counters are userspace VXLAN's counters. The zero value is ready.
type Counters struct{ counter.Set[Counter] }

// SnapshotInto adds every counter, by name, to m.
func (c *Counters) SnapshotInto(m map[string]uint64) { c.Set.SnapshotInto(counterNames[:], m) }
