package udpsock

import (
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestListenSteered: datagrams whose flag bit is set reach the sparse
// socket, the rest the first one (short ones too); the sparse socket sends
// with its own TTL; and the port stays exclusive: a second bind of it,
// plain or steered, fails as it did before the group existed.
func TestListenSteered(t *testing.T) {
	s, err := ListenSteered(netip.MustParseAddrPort("127.0.0.1:0"), false, false, 6, 1)
	if err != nil {
		t.Fatal(err)
	}
	ss := Sockets{s}
	defer ss.Close()
	if s.Sparse == nil {
		t.Fatalf("no sparse socket: %v", s.NoSparse)
	}
	if s.Sparse.LocalAddr() != s.LocalAddr() {
		t.Fatalf("sparse socket on %s, first on %s", s.Sparse.LocalAddr(), s.LocalAddr())
	}
	c, err := net.Dial("udp4", s.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sent := map[string]bool{} // payload → flagged
	for i, d := range [][]byte{
		{0x12, 2, 0, 1, 0, 1, 1, 0},    // flagged
		{0x12, 2, 0, 2, 0, 1, 0, 0},    // not
		{0x12, 2, 0, 3, 0, 1, 0xfe, 0}, // other bits only: not
		{0x12, 2, 0, 4, 0, 1, 0xff, 0}, // flagged among others
		{0x12, 2, 0},                   // too short to hold the flag: the first socket
	} {
		sent[string(d)] = i == 0 || i == 3
		if _, err := c.Write(d); err != nil {
			t.Fatal(err)
		}
	}
	read := func(sk *Socket) map[string]bool {
		got := map[string]bool{}
		buf := make([]byte, 64)
		for {
			sk.Conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
			n, err := sk.Conn.Read(buf)
			if err != nil {
				return got
			}
			got[string(buf[:n])] = true
		}
	}
	first, sparse := read(s), read(s.Sparse)
	for d, flagged := range sent {
		if flagged && !sparse[d] || !flagged && !first[d] {
			t.Errorf("datagram %x (flagged %v): first socket %v, sparse %v", d, flagged, first[d], sparse[d])
		}
	}
	if len(first)+len(sparse) != len(sent) {
		t.Errorf("%d + %d datagrams read, %d sent", len(first), len(sparse), len(sent))
	}
	if err := control(s.Sparse, func(fd int) error {
		ttl, err := unix.GetsockoptInt(fd, unix.IPPROTO_IP, unix.IP_TTL)
		if err == nil && ttl != sparseTTL {
			t.Errorf("sparse socket TTL %d, want %d", ttl, sparseTTL)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	for name, bind := range map[string]func() (*Socket, error){
		"plain":   func() (*Socket, error) { return Listen(s.LocalAddr(), false, false) },
		"steered": func() (*Socket, error) { return ListenSteered(s.LocalAddr(), false, false, 6, 1) },
	} {
		if s2, err := bind(); err == nil {
			Sockets{s2}.Close()
			t.Errorf("%s: a second bind of %s succeeded", name, s.LocalAddr())
		} else if !errors.Is(err, unix.EADDRINUSE) {
			t.Errorf("%s: a second bind of %s: %v, want EADDRINUSE", name, s.LocalAddr(), err)
		}
	}
}
