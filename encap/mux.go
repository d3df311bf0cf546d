package encap

import (
	"errors"
	"net/netip"

	"github.com/tulle-net/tulle/tunnel"
)

// Userspace is a backend that moves packets itself: a tunnel.Transport for
// the peers it serves.
type Userspace interface {
	tunnel.Transport
	// Serves reports whether the endpoint is one of its peers'.
	Serves(netip.AddrPort) bool
	// SetMTU follows an underlay MTU change.
	SetMTU(underlayMTU int)
}

// Mux presents several userspace backends to the datapath as one
// tunnel.Transport (as Tailscale's magicsock presents many paths as one
// wireguard-go Bind): each frame goes to the first backend that serves
// its endpoint, the rest to the default, and every backend's receivers
// feed the datapath. The datapath never learns how a packet travels.
type Mux struct {
	def    Userspace
	others []Userspace
	parts  [][]tunnel.Frame // per backend, reused: others..., def
}

var _ tunnel.Transport = (*Mux)(nil)

// NewMux returns a Mux over def (udp: it reaches any endpoint) and others.
func NewMux(def Userspace, others ...Userspace) *Mux {
	return &Mux{def: def, others: others, parts: make([][]tunnel.Frame, len(others)+1)}
}

// Send implements tunnel.Transport. Called by the datapath's tx goroutine
// only.
func (m *Mux) Send(frames []tunnel.Frame) error {
	if len(m.others) == 0 {
		return m.def.Send(frames)
	}
	for i := range m.parts {
		m.parts[i] = m.parts[i][:0]
	}
	for i := range frames {
		k := len(m.others)
		for j, o := range m.others {
			if o.Serves(frames[i].Addr) {
				k = j
				break
			}
		}
		m.parts[k] = append(m.parts[k], frames[i])
	}
	var errs []error
	for i, p := range m.parts {
		if len(p) == 0 {
			continue
		}
		if err := m.backend(i).Send(p); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (m *Mux) backend(i int) Userspace {
	if i == len(m.others) {
		return m.def
	}
	return m.others[i]
}

// Receivers implements tunnel.Transport: every backend's.
func (m *Mux) Receivers() []tunnel.ReceiveFunc {
	var fns []tunnel.ReceiveFunc
	for i := range m.parts {
		fns = append(fns, m.backend(i).Receivers()...)
	}
	return fns
}

// SetMTU passes an underlay MTU change to every backend.
func (m *Mux) SetMTU(underlayMTU int) {
	for i := range m.parts {
		m.backend(i).SetMTU(underlayMTU)
	}
}

// Close implements tunnel.Transport: it closes every backend.
func (m *Mux) Close() error {
	var errs []error
	for i := range m.parts {
		errs = append(errs, m.backend(i).Close())
	}
	return errors.Join(errs...)
}
