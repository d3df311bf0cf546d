// Package bench measures tulle's datapaths against their references with
// iperf3 on a namespace topology: the raw underlay (veth, no overlay),
// kernel VXLAN (the reference an overlay is judged by) and each tulle
// backend, all on the same nodes in the same run, interleaved so drift hits
// every path alike.
//
// It only ever configures namespaces it made (internal/topo); the host's
// own interfaces are never touched.
package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"strconv"
	"time"

	"github.com/tulle-net/tulle/internal/topo"
)

// Iperf3Result is the part of iperf3's JSON report (-J) the harness uses.
type Iperf3Result struct {
	Start struct {
		TestStart struct {
			Protocol   string `json:"protocol"`
			NumStreams int    `json:"num_streams"`
			Duration   int    `json:"duration"`
		} `json:"test_start"`
	} `json:"start"`
	End struct {
		SumSent struct {
			Bytes         float64 `json:"bytes"`
			BitsPerSecond float64 `json:"bits_per_second"`
			Retransmits   int     `json:"retransmits"`
		} `json:"sum_sent"`
		SumReceived struct {
			Bytes         float64 `json:"bytes"`
			BitsPerSecond float64 `json:"bits_per_second"`
		} `json:"sum_received"`
		CPU struct {
			HostTotal   float64 `json:"host_total"`
			RemoteTotal float64 `json:"remote_total"`
		} `json:"cpu_utilization_percent"`
	} `json:"end"`
	Error string `json:"error"`
}

// ParseIperf3 decodes an iperf3 -J report. A report carrying iperf3's own
// error, or no received bytes, is an error.
func ParseIperf3(b []byte) (*Iperf3Result, error) {
	var r Iperf3Result
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("iperf3 JSON: %w", err)
	}
	if r.Error != "" {
		return &r, fmt.Errorf("iperf3: %s", r.Error)
	}
	if r.End.SumReceived.Bytes <= 0 {
		return &r, errors.New("iperf3: nothing received")
	}
	return &r, nil
}

// Gbps is the receiver-side TCP goodput.
func (r *Iperf3Result) Gbps() float64 { return r.End.SumReceived.BitsPerSecond / 1e9 }

// Iperf3Server is an iperf3 server running in a node.
type Iperf3Server struct {
	cmd  *exec.Cmd
	Port int
}

// StartIperf3Server starts `iperf3 -s` in node on port.
func StartIperf3Server(n *topo.Node, port int) (*Iperf3Server, error) {
	cmd := n.Command(context.Background(), "iperf3", "-s", "-p", strconv.Itoa(port))
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start iperf3 server in %s: %w", n.NS, err)
	}
	s := &Iperf3Server{cmd: cmd, Port: port}
	// Wait until it listens.
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if out, _ := n.Run("ss", "-Htln", "sport", "= :"+strconv.Itoa(port)); out != "" {
			return s, nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	s.Stop()
	return nil, fmt.Errorf("iperf3 server in %s did not listen on %d", n.NS, port)
}

// Stop ends the server.
func (s *Iperf3Server) Stop() {
	s.cmd.Process.Kill()
	s.cmd.Wait()
}

// RunIperf3 runs a TCP client in node from against dst for d.
func RunIperf3(ctx context.Context, from *topo.Node, dst netip.Addr, port int, d time.Duration, streams int) (*Iperf3Result, error) {
	secs := strconv.Itoa(max(1, int(d.Round(time.Second)/time.Second)))
	out, err := from.Command(ctx, "iperf3", "-c", dst.String(), "-p", strconv.Itoa(port), "-t", secs, "-P", strconv.Itoa(streams), "-J").Output()
	r, perr := ParseIperf3(out)
	if perr != nil {
		return nil, fmt.Errorf("iperf3 %s → %s: %w (exit: %v)", from.Name, dst, perr, err)
	}
	return r, nil
}
