package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/tulle-net/tulle/lease"
	"github.com/tulle-net/tulle/tunnel"
)

// status is what GET /v1/status on the status socket returns.
type status struct {
	node    string
	lease   lease.Lease
	ctr     *tunnel.Counters
	peers   *tunnel.PeerTable
	mtu     int
	started time.Time

	mu       sync.Mutex
	allPeers []lease.Peer
}

func (s *status) setPeers(p []lease.Peer) {
	s.mu.Lock()
	s.allPeers = p
	s.mu.Unlock()
}

// Status is the JSON document of the status API.
type Status struct {
	Node     string            `json:"node"`
	Lease    lease.Lease       `json:"lease"`
	MTU      int               `json:"mtu"`
	Uptime   string            `json:"uptime"`
	Peers    []tunnel.Peer     `json:"peers"`
	Counters map[string]uint64 `json:"counters"`
}

func (s *status) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/v1/status" {
		http.NotFound(w, r)
		return
	}
	doc := Status{Node: s.node, Lease: s.lease, MTU: s.mtu, Uptime: time.Since(s.started).Round(time.Second).String(),
		Peers: s.peers.Peers(), Counters: s.ctr.Snapshot()}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(doc)
}

// serveStatus listens on a unix socket at path, replacing a stale one.
func serveStatus(path string, h http.Handler, log *slog.Logger) (*http.Server, error) {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("status socket: %w", err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("status socket: %w", err)
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Warn("status server", "err", err)
		}
	}()
	return srv, nil
}
