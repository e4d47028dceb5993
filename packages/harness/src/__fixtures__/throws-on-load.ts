/** A module that throws while it is evaluated. */
throw new Error('fixture exploded while loading')
