//! Weft CRDs (issue 6): being written.
