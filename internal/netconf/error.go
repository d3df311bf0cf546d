package netconf

import "fmt"

// ConfigError is configuration a node cannot run with: tulled exits 2
// with its one line, having created nothing.
type ConfigError struct {
	Msg string
	// Usage, if set, prints the usage after the line (an unknown flag).
	Usage func()
}

func (e *ConfigError) Error() string { return e.Msg }

// Errorf returns a *ConfigError.
func Errorf(format string, a ...any) error { return &ConfigError{Msg: fmt.Sprintf(format, a...)} }
