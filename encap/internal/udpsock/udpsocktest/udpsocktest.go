// Package udpsocktest serves prepared UDP messages to receivers as
// recvmmsg would, with UDP_GRO control messages, so the userspace
// backends' receive paths are tested without sockets.
package udpsocktest

import (
	"encoding/binary"
	"net"
	"net/netip"
	"unsafe"

	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"
)

// Msg is one received message: a datagram, or several of GSO bytes each
// (the last may be shorter) as UDP_GRO delivers them.
type Msg struct {
	Data []byte
	GSO  int
	Src  netip.AddrPort
}

// Reader hands out Msgs in order, as many as fit each call, then
// net.ErrClosed.
type Reader struct {
	Msgs []Msg
}

// Read has the signature of a batch read (ipv4.PacketConn.ReadBatch).
func (f *Reader) Read(ms []ipv4.Message, _ int) (int, error) {
	if len(f.Msgs) == 0 {
		return 0, net.ErrClosed
	}
	n := 0
	for n < len(ms) && len(f.Msgs) > 0 {
		m := f.Msgs[0]
		f.Msgs = f.Msgs[1:]
		ms[n].N = copy(ms[n].Buffers[0], m.Data)
		ms[n].NN = 0
		if m.GSO > 0 {
			ms[n].NN = putGRO(ms[n].OOB, m.GSO)
		}
		ms[n].Addr = net.UDPAddrFromAddrPort(m.Src)
		n++
	}
	return n, nil
}

// putGRO writes a UDP_GRO control message with segment size seg.
func putGRO(b []byte, seg int) int {
	h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
	h.Level = unix.SOL_UDP
	h.Type = unix.UDP_GRO
	h.SetLen(unix.CmsgLen(4))
	binary.NativeEndian.PutUint32(b[unix.CmsgLen(0):], uint32(seg))
	return unix.CmsgSpace(4)
}

// Conn records what is written to it, each GSO message split into its
// datagrams as the kernel would put them on the wire; reads report
// net.ErrClosed. It satisfies udpsock.BatchConn.
type Conn struct {
	// Sent are the datagrams written, Src holding the destination.
	Sent []Msg
	// Messages counts the messages (sendmmsg entries) written.
	Messages int
}

// ReadBatch implements udpsock.BatchConn.
func (c *Conn) ReadBatch([]ipv4.Message, int) (int, error) { return 0, net.ErrClosed }

// WriteBatch implements udpsock.BatchConn.
func (c *Conn) WriteBatch(ms []ipv4.Message, _ int) (int, error) {
	for _, m := range ms {
		c.Messages++
		data := m.Buffers[0]
		seg := segment(m.OOB)
		if seg == 0 {
			seg = len(data)
		}
		dst := m.Addr.(*net.UDPAddr).AddrPort()
		for len(data) > 0 {
			n := min(seg, len(data))
			c.Sent = append(c.Sent, Msg{Data: append([]byte(nil), data[:n]...), Src: dst})
			data = data[n:]
		}
	}
	return len(ms), nil
}

// segment reads a UDP_SEGMENT control message, or 0.
func segment(oob []byte) int {
	if len(oob) < unix.CmsgLen(2) {
		return 0
	}
	h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
	if h.Level != unix.SOL_UDP || h.Type != unix.UDP_SEGMENT {
		return 0
	}
	return int(binary.NativeEndian.Uint16(oob[unix.CmsgLen(0):]))
}
