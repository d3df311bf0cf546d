package udp

import (
	"bytes"
	"net"
	"net/netip"
	"os"
	"testing"

	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"

	"github.com/tulle-net/tulle/encap/internal/udpsock"
	"github.com/tulle-net/tulle/encap/internal/udpsock/udpsocktest"
	"github.com/tulle-net/tulle/tunnel"
	"github.com/tulle-net/tulle/tunnel/tuntest"
)

// eioConn fails every GSO message with EIO, as sendmmsg does when the
// egress device cannot offload, and records what it sends.
type eioConn struct {
	calls int
	sent  [][]byte // datagrams as they would go on the wire
	gso   int      // GSO messages seen
}

func (c *eioConn) ReadBatch(ms []ipv4.Message, flags int) (int, error) { return 0, net.ErrClosed }

func (c *eioConn) WriteBatch(ms []ipv4.Message, flags int) (int, error) {
	c.calls++
	for i, m := range ms {
		if len(m.OOB) > 0 {
			c.gso++
			return i, &net.OpError{Op: "write", Err: os.NewSyscallError("sendmmsg", unix.EIO)}
		}
		c.sent = append(c.sent, append([]byte(nil), m.Buffers[0]...))
	}
	return len(ms), nil
}

func TestGSOFallbackOnEIO(t *testing.T) {
	tr := testTransport()
	fc := &eioConn{}
	tr.socks = udpsock.Sockets{{BC: fc}}
	tr.socks[0].SetMTU(1500)
	dst := netip.MustParseAddrPort("198.18.0.2:8285")
	small := tuntest.TCP(netip.MustParseAddr("100.96.1.1"), netip.MustParseAddr("100.96.2.1"), 100)
	big := tuntest.TCP(netip.MustParseAddr("100.96.1.1"), netip.MustParseAddr("100.96.2.1"), 30000)
	frame := func(p []byte, o tunnel.Offload) tunnel.Frame {
		return tunnel.Frame{Buf: append(make([]byte, tunnel.Headroom), p...), Off: tunnel.Headroom, Offload: o, Addr: dst}
	}
	frames := []tunnel.Frame{frame(small, tunnel.Offload{}), frame(big, tuntest.TSO(big, 1400)), frame(big, tuntest.TSO(big, 1400))}
	if err := tr.Send(frames); err != nil {
		t.Fatal(err)
	}
	if tr.socks[0].GSO() {
		t.Fatal("GSO still on after EIO")
	}
	if n := tr.ctr.Get(GSOFallbacks); n != 1 {
		t.Errorf("gso_fallbacks = %d, want 1", n)
	}
	if fc.gso != 1 {
		t.Errorf("%d GSO sends attempted, want exactly 1 (then no more)", fc.gso)
	}
	// 1 packet + 2 super-packets cut into 22 datagrams of one segment.
	if want := 1 + 2*22; len(fc.sent) != want {
		t.Fatalf("sent %d datagrams, want %d", len(fc.sent), want)
	}
	// Arriving one per message, they merge into the original frames.
	fr := &udpsocktest.Reader{}
	for _, d := range fc.sent {
		fr.Msgs = append(fr.Msgs, udpsocktest.Msg{Data: d, Src: dst})
	}
	got, frames := drain(newReceiver(testTransport(), fr.Read, true, false), 4)
	if len(got) < 3 || !bytes.Equal(got[0], small) {
		t.Fatalf("fallback datagrams did not merge into the frames (%d came out)", len(got))
	}
	var segs [][]byte
	for i := 1; i < len(got); i++ {
		segs = append(segs, tuntest.Segments(t, got[i], frames[i].Offload)...)
	}
	want := tuntest.Segments(t, big, tuntest.TSO(big, 1400))
	sameSegments(t, segs, append(want, want...))
	// Later sends go straight to single datagrams.
	before := fc.calls
	if err := tr.Send([]tunnel.Frame{frame(big, tuntest.TSO(big, 1400))}); err != nil {
		t.Fatal(err)
	}
	if fc.gso != 1 || fc.calls != before+1 {
		t.Errorf("after fallback: %d GSO attempts, %d calls; want no GSO and one call", fc.gso, fc.calls-before)
	}
}

// recConn records the messages of each WriteBatch.
type recConn struct {
	msgs []recMsg
}

type recMsg struct {
	to   string
	size int
	gso  bool
}

func (c *recConn) ReadBatch(ms []ipv4.Message, flags int) (int, error) { return 0, net.ErrClosed }

func (c *recConn) WriteBatch(ms []ipv4.Message, flags int) (int, error) {
	for _, m := range ms {
		c.msgs = append(c.msgs, recMsg{to: m.Addr.String(), size: len(m.Buffers[0]), gso: len(m.OOB) > 0})
	}
	return len(ms), nil
}

func TestSingleDatagramsCoalesce(t *testing.T) {
	tr := testTransport()
	rc := &recConn{}
	tr.socks = udpsock.Sockets{{BC: rc}}
	tr.socks[0].SetMTU(1500)
	b, c := netip.MustParseAddrPort("198.18.0.2:8285"), netip.MustParseAddrPort("198.18.0.3:8285")
	pkt := func(n int, to netip.AddrPort) tunnel.Frame {
		p := tuntest.TCP(netip.MustParseAddr("100.96.1.1"), netip.MustParseAddr("100.96.2.1"), n)
		return tunnel.Frame{Buf: append(make([]byte, tunnel.Headroom), p...), Off: tunnel.Headroom, Addr: to}
	}
	var fs []tunnel.Frame
	for range 70 { // 70 × 108-byte datagrams to b: 64 per GSO message, then 6
		fs = append(fs, pkt(60, b))
	}
	fs = append(fs, pkt(10, b))  // shorter: ends the run, joins it
	fs = append(fs, pkt(60, b))  // after a shorter one: a new message
	fs = append(fs, pkt(60, c))  // another peer: a new message
	fs = append(fs, pkt(100, c)) // larger than the run's size: a new message
	if err := tr.Send(fs); err != nil {
		t.Fatal(err)
	}
	want := []recMsg{
		{b.String(), 64 * 108, true},
		{b.String(), 6*108 + 58, true},
		{b.String(), 108, false},
		{c.String(), 108, false},
		{c.String(), 148, false},
	}
	if len(rc.msgs) != len(want) {
		t.Fatalf("sent %d messages %+v, want %d", len(rc.msgs), rc.msgs, len(want))
	}
	for i := range want {
		if rc.msgs[i] != want[i] {
			t.Errorf("message %d = %+v, want %+v", i, rc.msgs[i], want[i])
		}
	}
	if n := tr.ctr.Get(DatagramsOut); n != 74 {
		t.Errorf("datagrams_out = %d, want 74", n)
	}
}
