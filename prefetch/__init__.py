"""prefetch: boot traces. `recorder` notes what a boot touches and saves it (with a
pack of its chunks in first-access order); `replay` merges earlier boots' traces and
fetches ahead of the process; `heuristics` guesses when there is no trace."""
