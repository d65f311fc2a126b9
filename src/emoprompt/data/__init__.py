"""The EmoEvalEs data: download with checksums, validated splits, the seeded evaluation sample."""
