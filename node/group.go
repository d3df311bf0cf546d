package node

import (
	"context"
	"errors"
	"sync"
)

// group runs a node's loops: the first to end, with an error or without,
// ends them all (each returns once its context is done).
type group struct {
	ctx    context.Context
	cancel context.CancelCauseFunc
	wg     sync.WaitGroup
}

func newGroup(parent context.Context) *group {
	ctx, cancel := context.WithCancelCause(parent)
	return &group{ctx: ctx, cancel: cancel}
}

// Go runs f in the group.
func (g *group) Go(f func(context.Context) error) {
	g.wg.Go(func() { g.cancel(f(g.ctx)) })
}

// Wait waits for the group to end and returns why it ended: the first
// loop's error, nil for a stop.
func (g *group) Wait() error {
	<-g.ctx.Done()
	g.cancel(nil)
	g.wg.Wait()
	if err := context.Cause(g.ctx); !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}
