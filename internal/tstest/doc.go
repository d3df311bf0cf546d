// Package tstest is tulle's proving ground: what tests, the demo and the
// benchmarks run tulle in, none of it shipped in tulled, tulle or the
// image. Its packages build network namespace topologies (topo), run
// tulled processes on them (cluster), a real API server (kubetest), a real
// cluster on one machine (kubecluster), the upstream conformance suites
// against it (conformance), the stock wireguard-go (wggo), and decide what
// a test does when the machine lacks something (testenv).
package tstest
