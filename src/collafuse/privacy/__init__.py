"""What the server learns from the disclosures, formally and by attack (docs/method.md §5).

- :mod:`collafuse.privacy.accountant`: the upload ``x_tc`` as a Gaussian mechanism, accounted
  exactly with Gaussian differential privacy (whole-image and per-pixel epsilon).
- :mod:`collafuse.privacy.attacks`: an honest-but-curious server's empirical attacks
  (reconstruction, re-identification, membership inference, memorisation), each defined so that
  two people compute the same number.
"""
