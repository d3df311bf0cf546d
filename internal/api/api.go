// Package api defines tulled's local status API (HTTP over the unix socket
// RUN_DIR/tulled.sock) and a client for it. tullectl, the demo, the tests
// and the benchmark harness read tulled through it.
package api

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/tulle-net/tulle/lease"
	"github.com/tulle-net/tulle/tunnel"
)

// SocketName is the status socket's file name inside the run directory.
const SocketName = "tulled.sock"

// StatusPath is the status document's URL path.
const StatusPath = "/v1/status"

// Status is the document GET /v1/status returns.
type Status struct {
	Node string `json:"node"`
	PID  int    `json:"pid"`
	// NotReady says why tulled is not ready (e.g. the Kubernetes API is
	// unreachable; it forwards with the last known peers meanwhile).
	NotReady string            `json:"notReady,omitempty"`
	Lease    lease.Lease       `json:"lease"`
	MTU      int               `json:"mtu"`
	Uptime   string            `json:"uptime"`
	Peers    []tunnel.Peer     `json:"peers"`
	Counters map[string]uint64 `json:"counters"`
}

// Get fetches the status from the socket at path.
func Get(ctx context.Context, socket string) (*Status, error) {
	c := &http.Client{
		Timeout: 5 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		}},
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://tulled"+StatusPath, nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, fmt.Errorf("tulled status at %s: %w", socket, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("tulled status at %s: %s", socket, resp.Status)
	}
	var s Status
	if err := json.NewDecoder(resp.Body).Decode(&s); err != nil {
		return nil, fmt.Errorf("tulled status at %s: %w", socket, err)
	}
	return &s, nil
}
