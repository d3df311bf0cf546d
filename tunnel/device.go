package tunnel

// Device is the kernel side of the datapath: a TUN device read and written
// in batches of frames.
type Device interface {
	// Read blocks until at least one frame is available, then reads up to
	// len(frames). Each frames[i].Buf must be BufSize long; Read sets Off
	// (≥ Headroom) and Offload and reslices Buf to the packet's end.
	Read(frames []Frame) (int, error)
	// Write hands frames to the kernel in order. It never writes outside
	// Frame.Packet(). A frame the kernel refuses is counted and skipped; the
	// error is for a dead device. Safe for concurrent use.
	Write(frames []Frame) error
	// Name returns the interface name.
	Name() string
	// Close detaches from the device. A persistent device stays.
	Close() error
}

// Transport is the underlay side of the datapath: it encapsulates frames to
// peers and decapsulates what peers send.
type Transport interface {
	// Send sends each frame to its Addr. Failures are counted by the
	// transport; the error is for a dead transport. Safe for concurrent
	// use: each tx loop (one per device queue) calls it.
	Send(frames []Frame) error
	// Receivers returns one blocking receive function per socket; each is
	// run by its own goroutine.
	Receivers() []ReceiveFunc
	// Close unblocks receivers and releases sockets.
	Close() error
}

// ReceiveFunc blocks until at least one frame arrived, fills frames[:n] (Addr
// = the sending peer) and returns n. The frames stay valid until the next
// call of the same function.
type ReceiveFunc func(frames []Frame) (n int, err error)

// Queue is one queue of a device: read by one tx loop, written by receive
// loops. Device's Read and Write are its first queue's.
type Queue interface {
	Read(frames []Frame) (int, error)
	Write(frames []Frame) error
}

// MultiQueue is a Device with several queues (a multi-queue TUN): the
// datapath runs one tx loop per queue. The kernel keeps a flow on one
// queue, so a flow is never reordered.
type MultiQueue interface {
	Queues() []Queue
}
