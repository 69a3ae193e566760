"""Provider adapters: one per broker, all behind `providers.base.Provider`."""
