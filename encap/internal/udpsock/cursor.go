package udpsock

import (
	"net/netip"

	"golang.org/x/net/ipv4"
)

// ReadFunc reads a batch of messages (ipv4.PacketConn.ReadBatch).
type ReadFunc func(ms []ipv4.Message, flags int) (int, error)

// Cursor walks the datagrams of recvmmsg batches: each message is one
// datagram, or with UDP_GRO several of Seg bytes (the last may be
// shorter). A caller may hand out part of a message and the rest on its
// next call, and may look ahead in the current message (Data, Off).
// Messages land at a fixed headroom in their buffers, so a datagram can
// be rewritten in place with room in front.
type Cursor struct {
	read     ReadFunc
	admit    func(src netip.AddrPort, datagrams int) bool
	headroom int
	msgs     []ipv4.Message
	iovs     [][1][]byte
	bufs     [][]byte
	oobs     [][]byte
	n, mi    int

	// Off is the offset, in Data, of the current message's next datagram;
	// a caller that consumes datagrams by looking ahead moves it on.
	Off int
	// Seg is the datagram size of the current message.
	Seg int
	// Src is the sender of the current message.
	Src netip.AddrPort
}

// NewCursor returns a Cursor reading batch messages of up to bufSize
// bytes, each after headroom bytes. admit is asked about every message's
// source (with its datagram count) and skips the message when it says no.
func NewCursor(read ReadFunc, batch, headroom, bufSize int, admit func(src netip.AddrPort, datagrams int) bool) *Cursor {
	c := &Cursor{read: read, admit: admit, headroom: headroom}
	c.msgs = make([]ipv4.Message, batch)
	c.iovs = make([][1][]byte, batch)
	c.bufs = make([][]byte, batch)
	c.oobs = make([][]byte, batch)
	for i := range c.msgs {
		c.bufs[i] = make([]byte, headroom+bufSize)
		c.oobs[i] = make([]byte, OOBSize)
	}
	return c
}

// Done reports whether the batch is used up: Fill before taking more.
func (c *Cursor) Done() bool { return c.mi >= c.n }

// Fill reads a new batch (blocking) and moves to its first admitted
// message. It overwrites the buffers of the previous batch.
func (c *Cursor) Fill() error {
	for i := range c.msgs {
		c.iovs[i][0] = c.bufs[i][c.headroom:]
		c.msgs[i] = ipv4.Message{Buffers: c.iovs[i][:], OOB: c.oobs[i]}
	}
	n, err := c.read(c.msgs, 0)
	if err != nil {
		return err
	}
	c.n, c.mi = n, -1
	c.advance()
	return nil
}

// advance moves to the next admitted message.
func (c *Cursor) advance() {
	for c.mi++; c.mi < c.n; c.mi++ {
		m := &c.msgs[c.mi]
		c.Off = 0
		c.Seg = GROSize(m.OOB[:m.NN])
		if c.Seg <= 0 || c.Seg > m.N {
			c.Seg = m.N
		}
		src, ok := Source(m)
		if !ok || m.N == 0 {
			continue
		}
		c.Src = src
		if c.admit(src, (m.N+c.Seg-1)/c.Seg) {
			return
		}
	}
}

// Buf is the current message's buffer: headroom, then Data.
func (c *Cursor) Buf() []byte { return c.bufs[c.mi] }

// Data is the current message's datagrams.
func (c *Cursor) Data() []byte { return c.bufs[c.mi][c.headroom : c.headroom+c.msgs[c.mi].N] }

// Peek returns the current message's next datagram without consuming it
// (nil when the message is used up): a caller that takes it moves Off on
// by its length.
func (c *Cursor) Peek() []byte {
	data := c.Data()
	if c.Off >= len(data) {
		return nil
	}
	return data[c.Off:min(c.Off+c.Seg, len(data))]
}

// Take consumes the current message's next datagram and returns it with
// its offset in Buf.
func (c *Cursor) Take() (base int, dg []byte) {
	base, dg = c.headroom+c.Off, c.Peek()
	c.Off += len(dg)
	return base, dg
}

// Settle moves to the next admitted message once the current one is used
// up. Call it after handling what Take returned (and any look-ahead); a
// look-ahead may call it too, to go on into the next message (the buffers
// of the batch stay valid until Fill).
func (c *Cursor) Settle() {
	if c.mi < c.n && c.Off >= c.msgs[c.mi].N {
		c.advance()
	}
}
