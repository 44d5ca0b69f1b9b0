"""The window lengths the published models were trained with and run at, in latent frames (4 video frames each
after the first). Torch-free, so input checks can use them before any model loads."""

STABLEAVATAR_WINDOW = 21  # 81 video frames per window, as StableAvatar was trained
FLASHPORTRAIT_WINDOW = 51  # 201 video frames per window, as FlashPortrait runs
FLASHPORTRAIT_OVERLAP = 30  # FlashPortrait's published overlap between windows
