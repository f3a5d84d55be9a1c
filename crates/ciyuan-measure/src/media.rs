//! Media token formulas (images, audio, video) as providers document them.
