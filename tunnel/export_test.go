package tunnel

// Shed is shed, for the external tests that build packets with tuntest.
var Shed = shed
