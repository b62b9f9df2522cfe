package wire

// HoldResult is the one JSON line `podbin hold` prints when it ends.
type HoldResult struct {
	// Opened counts connections that completed the HELLO exchange;
	// Failed those that did not, FirstErr says why the first one failed.
	Opened   int    `json:"opened"`
	Failed   int    `json:"failed"`
	FirstErr string `json:"firstErr,omitempty"`
	// OpenSeconds is how long opening them all took.
	OpenSeconds float64 `json:"openSeconds"`
	// Alive counts the opened connections still open, neither closed nor
	// reset by the peer, when the hold ended.
	Alive int `json:"alive"`
}
