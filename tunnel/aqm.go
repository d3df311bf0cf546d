package tunnel

import (
	"encoding/binary"
	"math"

	"github.com/tulle-net/tulle/internal/inet"
)

// AQM defaults: a bulk queue that has not been drained for Target plus
// Interval gets its first signal; signals then come faster (Interval/√n)
// until a read drains it. The figures suit a datacenter overlay, where a
// round trip is well under a millisecond: CoDel's own 5 ms/100 ms would
// let a bulk flow keep 100 ms of data in the TUN before anything happens.
const (
	AQMTarget   = 2e6  // ns
	AQMInterval = 20e6 // ns
)

// codel is a CoDel-like controller (RFC 8289) for one TUN queue, read by
// one tx loop. The kernel gives no sojourn time for what waits in a TUN's
// ring and its queue never stops (tun_net_xmit orphans each packet), so
// the signal is how long the ring has gone without being drained: a read
// that returns fewer frames than asked found it empty. A queue that is
// never empty for Target is a standing queue; once that has lasted
// Interval, one packet of the batch being read is marked (ECN) or
// shortened by a segment, and the next signal comes Interval/√count
// later, as CoDel's control law spaces drops. A drained read ends it.
type codel struct {
	target, interval int64

	lastDrained int64 // when a read last found the ring empty
	firstAbove  int64 // when a standing queue becomes a signal; 0: none
	dropping    bool
	count       int   // signals in this (or the last) dropping state
	lastCount   int   // count when the last dropping state began
	dropNext    int64 // the next signal while dropping
}

func newCodel(target, interval int64) *codel {
	return &codel{target: target, interval: interval}
}

// read is told of every batch read from the queue: drained when the read
// emptied it. It reports whether the batch should carry a signal.
func (c *codel) read(now int64, drained bool) bool {
	if drained || c.lastDrained == 0 {
		c.lastDrained = now
		c.firstAbove = 0
		c.dropping = false
		return false
	}
	ok := false
	switch {
	case now-c.lastDrained < c.target:
		c.firstAbove = 0
	case c.firstAbove == 0:
		c.firstAbove = now + c.interval
	case now >= c.firstAbove:
		ok = true
	}
	if c.dropping {
		if !ok {
			c.dropping = false
			return false
		}
		if now < c.dropNext {
			return false
		}
		c.count++
		c.dropNext = c.law(c.dropNext)
		return true
	}
	if !ok {
		return false
	}
	// Enter the dropping state. If the last one ended recently, resume
	// near its rate rather than from one (RFC 8289 §5.5).
	c.dropping = true
	if d := c.count - c.lastCount; d > 1 && now-c.dropNext < 16*c.interval {
		c.count = d
	} else {
		c.count = 1
	}
	c.lastCount = c.count
	c.dropNext = c.law(now)
	return true
}

// law is CoDel's control law: the next signal after t.
func (c *codel) law(t int64) int64 {
	return t + int64(float64(c.interval)/math.Sqrt(float64(c.count)))
}

// Signal is what shed did to a batch.
type Signal int

const (
	SignalNone Signal = iota
	SignalMark        // ECN CE set on an ECN-capable packet
	SignalTrim        // a TCP super-packet lost its last segment
	SignalDrop        // a packet was left out
)

var aqmCounter = [...]Counter{SignalMark: AQMMarks, SignalTrim: AQMTrims, SignalDrop: AQMDrops}

// shed signals congestion to the heaviest flow of a batch, which is what
// fills a bulk queue: its largest frame. An ECN-capable packet is marked
// CE (every segment the kernel cuts from it carries the mark, and the
// sender slows once per round trip); a TCP super-packet of two or more
// segments loses its last one (one MSS retransmitted, as a lost wire
// packet would cost); anything else is to be left out: drop is its index
// (-1 when nothing is to be left out).
func shed(fs []Frame) (drop int, sig Signal) {
	if len(fs) == 0 {
		return -1, SignalNone
	}
	big := 0
	for i := range fs {
		if len(fs[i].Packet()) > len(fs[big].Packet()) {
			big = i
		}
	}
	f := &fs[big]
	if markCE(f.Packet()) {
		return -1, SignalMark
	}
	if trimLast(f) {
		return -1, SignalTrim
	}
	return big, SignalDrop
}

// markCE sets ECN CE on an ECN-capable (ECT) IP packet and reports
// whether it did. An IPv4 header checksum is updated (RFC 1624).
func markCE(pkt []byte) bool {
	v, _, ok := ipHeaderLen(pkt)
	if !ok {
		return false
	}
	if v == 4 {
		tos := pkt[1]
		if tos&3 == 0 || tos&3 == 3 {
			return false
		}
		old := binary.BigEndian.Uint16(pkt[0:])
		pkt[1] = tos | 3
		sum := ^binary.BigEndian.Uint16(pkt[10:])
		s := uint32(sum) + uint32(^old) + uint32(binary.BigEndian.Uint16(pkt[0:]))
		binary.BigEndian.PutUint16(pkt[10:], ^inet.Fold(uint64(s)))
		return true
	}
	// IPv6: traffic class spans bytes 0 and 1; ECN is its low two bits,
	// bits 4–5 of byte 1. No header checksum.
	ecn := pkt[1] >> 4 & 3
	if ecn == 0 || ecn == 3 {
		return false
	}
	pkt[1] |= 3 << 4
	return true
}

// trimLast shortens a TCP super-packet of two or more segments by its
// last one, headers and partial checksum rewritten as for any cut piece.
func trimLast(f *Frame) bool {
	o := f.Offload
	if o.GSOType == GSONone || o.GSOType&^GSOECN == GSOUDPL4 {
		return false
	}
	pkt := f.Packet()
	hl, err := ValidateOffload(pkt, o)
	if err != nil {
		return false
	}
	c := newCut(pkt, o, int(hl))
	if c.count < 2 {
		return false
	}
	n := c.piece(pkt, 0, c.count-1, true)
	f.Buf = f.Buf[:f.Off+n]
	if c.count-1 == 1 {
		f.Offload.GSOType, f.Offload.GSOSize = GSONone, 0
	}
	return true
}
