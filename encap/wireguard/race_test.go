//go:build race

package wireguard

// raceEnabled: the race detector allocates on its own.
const raceEnabled = true
