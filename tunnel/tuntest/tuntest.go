// Package tuntest provides an in-memory tunnel.Device so datapath tests run
// without root, in the style of wireguard-go's tuntest.ChannelTUN.
package tuntest

import (
	"os"
	"sync"
	"sync/atomic"

	"github.com/tulle-net/tulle/tunnel"
)

// Packet is an IP packet with its offload metadata, as the kernel would
// hand it to (Inbound) or receive it from (Outbound) a TUN device.
type Packet struct {
	Data    []byte
	Offload tunnel.Offload
}

// ChanTUN is a tunnel.Device backed by channels.
type ChanTUN struct {
	// Inbound carries packets "from the kernel" to the datapath.
	Inbound chan Packet
	// Outbound carries what the datapath wrote "to the kernel".
	Outbound chan Packet
	refused  atomic.Int64
	waiting  atomic.Int64 // Reads blocked for a first packet

	closed chan struct{}
	once   *sync.Once // shared by the queues of a MultiChanTUN
}

// NewChanTUN returns a device with buffered channels.
func NewChanTUN() *ChanTUN {
	return &ChanTUN{Inbound: make(chan Packet, 1024), Outbound: make(chan Packet, 1024), closed: make(chan struct{}), once: new(sync.Once)}
}

// Waiting reports how many Reads are blocked waiting for a packet: a
// loop that has started and found its queue empty.
func (c *ChanTUN) Waiting() int { return int(c.waiting.Load()) }

// Refused counts writes a kernel would refuse (bad offload metadata).
func (c *ChanTUN) Refused() int { return int(c.refused.Load()) }

// Name implements tunnel.Device.
func (c *ChanTUN) Name() string { return "chantun" }

// Close implements tunnel.Device.
func (c *ChanTUN) Close() error {
	c.once.Do(func() { close(c.closed) })
	return nil
}

// Read implements tunnel.Device.
func (c *ChanTUN) Read(frames []tunnel.Frame) (int, error) {
	var p Packet
	select {
	case p = <-c.Inbound:
	default:
		c.waiting.Add(1)
		select {
		case p = <-c.Inbound:
		case <-c.closed:
			c.waiting.Add(-1)
			return 0, os.ErrClosed
		}
		c.waiting.Add(-1)
	}
	n := 0
	for {
		f := &frames[n]
		f.Off = tunnel.Headroom
		f.Buf = f.Buf[:tunnel.Headroom+copy(f.Buf[tunnel.Headroom:cap(f.Buf)], p.Data)]
		f.Offload = p.Offload
		n++
		if n == len(frames) {
			return n, nil
		}
		select {
		case p = <-c.Inbound:
		default:
			return n, nil
		}
	}
}

// Write implements tunnel.Device, refusing what a kernel would refuse.
func (c *ChanTUN) Write(frames []tunnel.Frame) error {
	for i := range frames {
		f := &frames[i]
		if _, err := tunnel.ValidateOffload(f.Packet(), f.Offload); err != nil {
			c.refused.Add(1)
			continue
		}
		p := Packet{Data: append([]byte(nil), f.Packet()...), Offload: f.Offload}
		select {
		case c.Outbound <- p:
		case <-c.closed:
			return os.ErrClosed
		}
	}
	return nil
}

// MultiChanTUN is a multi-queue tunnel.Device backed by channels: Queue[i]
// is queue i, with its own Inbound (what the kernel steers to that queue)
// and Outbound (what the datapath wrote through it). The device's own Read
// and Write are queue 0's.
type MultiChanTUN struct {
	*ChanTUN
	Queue []*ChanTUN
}

// NewMultiChanTUN returns a device of n queues.
func NewMultiChanTUN(n int) *MultiChanTUN {
	m := &MultiChanTUN{}
	closed, once := make(chan struct{}), new(sync.Once)
	for range n {
		q := NewChanTUN()
		q.closed, q.once = closed, once
		m.Queue = append(m.Queue, q)
	}
	m.ChanTUN = m.Queue[0]
	return m
}

// Queues implements tunnel.MultiQueue.
func (m *MultiChanTUN) Queues() []tunnel.Queue {
	qs := make([]tunnel.Queue, len(m.Queue))
	for i, q := range m.Queue {
		qs[i] = q
	}
	return qs
}
