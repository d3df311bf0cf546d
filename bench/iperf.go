// Package bench is tulle's benchmark harness: it builds a cluster of
// network namespaces on one machine, configures every datapath under test
// side by side — the raw underlay (veth, no overlay), kernel VXLAN (the
// reference an overlay is judged by) and each tulle backend this build has —
// and measures them with iperf3 and a request/response loop, interleaving
// paths round by round so drift hits all alike.
//
// It only configures namespaces it made (internal/topo) and removes them,
// and every process it started, when done, failed or interrupted.
package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/tulle-net/tulle/internal/tstest/topo"
)

// Iperf3Result is the part of an iperf3 -J report the harness uses.
type Iperf3Result struct {
	Start struct {
		TestStart struct {
			Protocol   string `json:"protocol"`
			NumStreams int    `json:"num_streams"`
			BlkSize    int    `json:"blksize"`
		} `json:"test_start"`
	} `json:"start"`
	End struct {
		// TCP
		SumSent struct {
			Bytes         float64 `json:"bytes"`
			Seconds       float64 `json:"seconds"`
			BitsPerSecond float64 `json:"bits_per_second"`
			Retransmits   int     `json:"retransmits"`
		} `json:"sum_sent"`
		SumReceived struct {
			Bytes         float64 `json:"bytes"`
			Seconds       float64 `json:"seconds"`
			BitsPerSecond float64 `json:"bits_per_second"`
		} `json:"sum_received"`
		// UDP
		Sum struct {
			Seconds     float64 `json:"seconds"`
			Packets     float64 `json:"packets"`
			LostPackets float64 `json:"lost_packets"`
			LostPercent float64 `json:"lost_percent"`
		} `json:"sum"`
	} `json:"end"`
	Error string `json:"error"`
}

// ParseIperf3 decodes an iperf3 -J report. A report carrying iperf3's own
// error, or showing nothing received, is an error.
func ParseIperf3(b []byte) (*Iperf3Result, error) {
	var r Iperf3Result
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("iperf3 JSON: %w", err)
	}
	if r.Error != "" {
		return &r, fmt.Errorf("iperf3: %s", r.Error)
	}
	if r.Start.TestStart.Protocol == "UDP" {
		if r.End.Sum.Packets-r.End.Sum.LostPackets <= 0 {
			return &r, errors.New("iperf3: no UDP packet arrived")
		}
		return &r, nil
	}
	if r.End.SumReceived.Bytes <= 0 {
		return &r, errors.New("iperf3: nothing received")
	}
	return &r, nil
}

// Gbps is the receiver-side TCP goodput.
func (r *Iperf3Result) Gbps() float64 { return r.End.SumReceived.BitsPerSecond / 1e9 }

// ReceivedPPS is the UDP packets per second that arrived.
func (r *Iperf3Result) ReceivedPPS() float64 {
	s := r.End.Sum
	if s.Seconds <= 0 {
		return 0
	}
	return (s.Packets - s.LostPackets) / s.Seconds
}

// LossPercent is the UDP loss iperf3 measured at the receiver.
func (r *Iperf3Result) LossPercent() float64 { return r.End.Sum.LostPercent }

// iperf3Server is an iperf3 server running in a node.
type iperf3Server struct {
	cmd *exec.Cmd
}

// startIperf3Server starts `iperf3 -s` in node n on port and waits until it
// listens.
func startIperf3Server(ctx context.Context, n *topo.Node, port int) (*iperf3Server, error) {
	cmd := n.Command(context.Background(), "iperf3", "-s", "-p", strconv.Itoa(port))
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start iperf3 server in %s: %w", n.NS, err)
	}
	s := &iperf3Server{cmd: cmd}
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		if out, _ := n.Run("ss", "-Htln", "sport", "= :"+strconv.Itoa(port)); strings.TrimSpace(out) != "" {
			return s, nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	s.stop()
	return nil, fmt.Errorf("iperf3 server in %s did not listen on port %d", n.NS, port)
}

func (s *iperf3Server) stop() {
	s.cmd.Process.Kill()
	s.cmd.Wait()
}

// iperf3Run describes one client run.
type iperf3Run struct {
	Dst      netip.Addr
	Port     int
	Duration time.Duration
	Streams  int // TCP parallel streams
	UDPSize  int // > 0: UDP with this payload size, unlimited rate
}

func (r iperf3Run) args() []string {
	secs := strconv.Itoa(max(1, int(r.Duration.Round(time.Second)/time.Second)))
	a := []string{"-c", r.Dst.String(), "-p", strconv.Itoa(r.Port), "-t", secs, "-J"}
	if r.UDPSize > 0 {
		return append(a, "-u", "-b", "0", "-l", strconv.Itoa(r.UDPSize))
	}
	return append(a, "-P", strconv.Itoa(max(1, r.Streams)))
}

// runIperf3 runs one client in node from.
func runIperf3(ctx context.Context, from *topo.Node, r iperf3Run) (*Iperf3Result, error) {
	out, err := from.Command(ctx, "iperf3", r.args()...).Output()
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	res, perr := ParseIperf3(out)
	if perr != nil {
		return nil, fmt.Errorf("iperf3 %s → %s: %w (exit: %v)", from.Name, r.Dst, perr, err)
	}
	return res, nil
}
