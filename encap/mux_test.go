package encap

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/tulle-net/tulle/tunnel"
)

// fakeBackend records what it is asked to send.
type fakeBackend struct {
	serves map[netip.AddrPort]bool // nil: everything
	sent   []netip.AddrPort
	mtu    int
	closed bool
	err    error
}

func (f *fakeBackend) Send(fs []tunnel.Frame) error {
	for _, x := range fs {
		f.sent = append(f.sent, x.Addr)
	}
	return f.err
}
func (f *fakeBackend) Receivers() []tunnel.ReceiveFunc {
	return []tunnel.ReceiveFunc{func([]tunnel.Frame) (int, error) { return 0, nil }}
}
func (f *fakeBackend) Close() error                 { f.closed = true; return nil }
func (f *fakeBackend) SetMTU(m int)                 { f.mtu = m }
func (f *fakeBackend) Serves(a netip.AddrPort) bool { return f.serves == nil || f.serves[a] }

func TestMux(t *testing.T) {
	u := netip.MustParseAddrPort("198.18.0.2:8285")
	v := netip.MustParseAddrPort("198.18.0.3:8472")
	def, vx := &fakeBackend{}, &fakeBackend{serves: map[netip.AddrPort]bool{v: true}}
	m := NewMux(def, vx)
	fs := []tunnel.Frame{{Addr: u}, {Addr: v}, {Addr: u}, {Addr: v}, {Addr: netip.MustParseAddrPort("198.18.0.9:1")}}
	if err := m.Send(fs); err != nil {
		t.Fatal(err)
	}
	if len(def.sent) != 3 || len(vx.sent) != 2 || vx.sent[0] != v || def.sent[0] != u {
		t.Errorf("udp got %v, vxlan got %v", def.sent, vx.sent)
	}
	if n := len(m.Receivers()); n != 2 {
		t.Errorf("%d receivers, want one per backend", n)
	}
	m.SetMTU(9000)
	if def.mtu != 9000 || vx.mtu != 9000 {
		t.Error("MTU not passed on")
	}
	vx.err = errors.New("dead")
	if err := m.Send(fs); err == nil {
		t.Error("a dead backend's error was lost")
	}
	if len(def.sent) != 6 {
		t.Error("a dead backend kept the others' frames from leaving")
	}
	m.Close()
	if !def.closed || !vx.closed {
		t.Error("Close left a backend open")
	}
	// Allocation-free once warmed up.
	vx.err = nil
	if a := testing.AllocsPerRun(100, func() { def.sent, vx.sent = def.sent[:0], vx.sent[:0]; m.Send(fs) }); a != 0 {
		t.Errorf("Send allocates %.0f times", a)
	}
}
