package wireguard

import "github.com/tulle-net/tulle/internal/counter"

// Counter names one counter of the WireGuard backend.
type Counter int

// The WireGuard backend's counters. Drops are counted by reason; nothing
// on the per-packet path logs, and nothing dropped is answered (but
// cookie replies under load).
const (
	DatagramsOut        Counter = iota // datagrams sent (transport and handshake)
	DatagramsIn                        // datagrams received
	DropSend                           // datagrams or frames the socket refused, or that could not be cut
	DropNoPeer                         // frames to an endpoint that is no WireGuard peer's
	Staged                             // frames held while a session is set up
	DropStaged                         // frames dropped: the staging queue was full, or the handshake gave up
	DropMalformed                      // datagrams of an unknown type or the wrong size
	DropUnknownIndex                   // transport messages or responses for no session or handshake of ours
	DropAuth                           // messages whose AEAD tag did not verify (forged, corrupted, wrong key)
	DropReplay                         // transport messages already received or behind the replay window
	DropExpired                        // transport messages on a session past its lifetime
	DropNotIP                          // decrypted packets that are not IPv4/IPv6 or are shorter than their header says
	DropAllowedIPs                     // packets outside the peer's subnets: decrypted ones from a source its key may not send from, frames to a destination its key does not own
	DropMAC1                           // handshake messages whose mac1 is not for this node's key
	DropUnknownKey                     // initiations from a static key that is no peer's
	DropStaleHandshake                 // initiations replayed (old timestamp) or too frequent (flood)
	DropHandshakeQueue                 // handshake messages dropped: the handshake queue was full
	DropRateLimited                    // handshake messages over a source's rate while under load
	CookiesSent                        // cookie replies sent while under load
	CookiesReceived                    // cookie replies accepted
	HandshakesSent                     // initiations sent (first tries and retries)
	HandshakesCompleted                // sessions established (as initiator or responder)
	HandshakesAbandoned                // handshake attempts given up after RekeyAttemptTime
	KeepalivesSent                     // keepalives sent
	KeepalivesReceived                 // keepalives received
	Coalesced                          // received packets merged into TSO super-packets before the TUN write
	GSOFallbacks                       // times UDP GSO was turned off after EIO
	numCounters
)

var counterNames = [numCounters]string{
	DatagramsOut: "wg_datagrams_out", DatagramsIn: "wg_datagrams_in", DropSend: "wg_drop_send", DropNoPeer: "wg_drop_no_peer",
	Staged: "wg_staged", DropStaged: "wg_drop_staged", DropMalformed: "wg_drop_malformed", DropUnknownIndex: "wg_drop_unknown_index",
	DropAuth: "wg_drop_auth", DropReplay: "wg_drop_replay", DropExpired: "wg_drop_expired", DropNotIP: "wg_drop_not_ip", DropAllowedIPs: "wg_drop_allowed_ips",
	DropMAC1: "wg_drop_mac1", DropUnknownKey: "wg_drop_unknown_key", DropStaleHandshake: "wg_drop_stale_handshake",
	DropHandshakeQueue: "wg_drop_handshake_queue", DropRateLimited: "wg_drop_rate_limited", CookiesSent: "wg_cookies_sent",
	CookiesReceived: "wg_cookies_received", HandshakesSent: "wg_handshakes_sent", HandshakesCompleted: "wg_handshakes_completed",
	HandshakesAbandoned: "wg_handshakes_abandoned", KeepalivesSent: "wg_keepalives_sent", KeepalivesReceived: "wg_keepalives_received",
	Coalesced: "wg_frames_coalesced", GSOFallbacks: "wg_gso_fallbacks",
}

// String returns the counter's name as the status API reports it.
func (c Counter) String() string { return counterNames[c] }

// Counters are the WireGuard backend's counters. The zero value is ready.
type Counters struct{ counter.Set[Counter] }

// SnapshotInto adds every counter, by name, to m.
func (c *Counters) SnapshotInto(m map[string]uint64) { c.Set.SnapshotInto(counterNames[:], m) }
