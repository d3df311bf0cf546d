// Package pool keeps reusable per-caller state (send buffers, scratch
// slices) for functions that several goroutines call at once: each call
// takes an object, uses it alone and gives it back.
//
// Unlike sync.Pool, a Pool never drops what it holds when the garbage
// collector runs (the objects are large, long-lived send slabs that would
// otherwise be reallocated after every GC), and it holds at most its
// capacity: a burst of callers beyond it allocates objects that are
// dropped on return.
package pool

// Pool holds up to its capacity of idle objects made by New.
type Pool[T any] struct {
	idle chan *T
	make func() *T
}

// New returns a pool holding at most capacity idle objects; newT makes one
// when none is idle.
func New[T any](capacity int, newT func() *T) *Pool[T] {
	return &Pool[T]{idle: make(chan *T, max(capacity, 1)), make: newT}
}

// Get returns an idle object, or a new one.
func (p *Pool[T]) Get() *T {
	select {
	case v := <-p.idle:
		return v
	default:
		return p.make()
	}
}

// Put returns an object for reuse; beyond the capacity it is dropped.
func (p *Pool[T]) Put(v *T) {
	select {
	case p.idle <- v:
	default:
	}
}
